"""Parsers of hostile bytes, fuzzed with hypothesis: the update envelope, serial frames and protocol
messages, the device's store state. Only edgepeft's own errors may come out, never a crash.

Each test reports how many inputs it tried (``pytest -s`` prints them; bounded for the default suite).
"""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edgepeft.errors import EdgePeftError  # noqa: E402
from edgepeft.spec.update import HEADER, MAGIC, encode_envelope, metadata_bytes, verify_envelope  # noqa: E402
from edgepeft.transport.framing import FrameDecoder, cobs_decode, cobs_encode, encode_frame  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRIED: dict[str, int] = {}


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    from edgepeft.bundle.signing import generate_keypair, load_private_key

    priv, pub = generate_keypair(tmp_path_factory.mktemp("k") / "fuzz")
    return load_private_key(priv), pub


def _count(name):
    TRIED[name] = TRIED.get(name, 0) + 1


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=5),
                           max_leaves=20)
VALID = {"schema_version": 1, "kind": "edgepeft-update", "type": "adapter", "created": "2026-11-26T00:00:00Z",
         "expires": None, "min_runtime": "0.2.0", "base_fingerprint": "a" * 64,
         "payload": {"size": 10, "sha256": "b" * 64, "format": "onnx_adapter"}, "health_checks": [],
         "adapter": {"name": "x", "version": 2, "file": "adapters/x-2.onnx_adapter", "method": "lora", "rank": 4,
                     "alpha": 8.0, "base_fingerprint": "a" * 64}, "slots": ["layers.0.qkv.lora_A"]}


@FUZZ
@given(raw=st.binary(max_size=600))
def test_envelope_parser_on_random_bytes(key, raw):
    _count("envelope: random bytes")
    for data in (raw, MAGIC + raw, HEADER.pack(MAGIC, 1, len(raw) // 2 + 1, len(raw) // 2 + 1) + raw):
        with pytest.raises(EdgePeftError):
            verify_envelope(data, [key[1]])


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(sorted(VALID) + ["extra"]), json_values, max_size=4),
       adapter_edits=st.dictionaries(st.sampled_from(sorted(VALID["adapter"]) + ["odd"]), json_values, max_size=3))
def test_signed_but_malformed_metadata_gives_a_spec_error(key, edits, adapter_edits):
    """Even a validly signed envelope must not crash the parser with any field of any type."""
    from edgepeft.bundle.signing import sign_bytes

    _count("envelope: signed, malformed metadata")
    meta = json.loads(json.dumps(VALID))
    meta.update(edits)
    if isinstance(meta.get("adapter"), dict):
        meta["adapter"].update(adapter_edits)
    try:
        body = metadata_bytes(meta)
    except (TypeError, ValueError):
        return  # not representable as JSON: never on the wire
    data = encode_envelope(body, [sign_bytes(body, key[0])])
    try:
        env = verify_envelope(data, [key[1]])
    except EdgePeftError:
        return
    assert env.meta.version >= 1 and env.meta.name


@FUZZ
@given(frames=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=8),
       noise=st.lists(st.tuples(st.integers(0, 2000), st.binary(min_size=1, max_size=20)), max_size=5),
       cut=st.integers(1, 97))
def test_frame_decoder_never_raises_and_keeps_every_clean_frame(frames, noise, cut):
    _count("serial frames with noise")
    stream = bytearray(b"".join(encode_frame(k, b) for k, b in frames))
    for at, junk in noise:
        stream[min(at, len(stream)):min(at, len(stream))] = junk
    dec = FrameDecoder()
    got = []
    for i in range(0, len(stream), cut):
        got += list(dec.feed(bytes(stream[i:i + cut])))
    if not noise:
        assert got == frames
    for k, b in got:
        assert 0 <= k <= 255 and isinstance(b, bytes)


@FUZZ
@given(data=st.binary(max_size=700))
def test_cobs_round_trip_and_garbage(data):
    _count("COBS")
    assert cobs_decode(cobs_encode(data)) == data
    try:
        cobs_decode(data.replace(b"\x00", b"\x01"))
    except ValueError:
        pass


@FUZZ
@given(body=st.binary(max_size=80), kind=st.sampled_from([ord(c) for c in "SDIRX"]))
def test_device_serial_handler_ignores_malformed_messages(tmp_path_factory, body, kind):
    """The device end of the serial link gets every message type with any body: no exception escapes."""
    from edgepeft.update.agent_serial import SerialAgent

    _count("serial messages to the device")

    class FakeReceiver:
        def status(self, id):
            return None

        def write(self, *a, **k):
            return {"status": "receiving", "offset": 0}

    class FakeDevice:
        receiver = FakeReceiver()

        def status(self):
            return {"ok": True}

        def rollback(self, name, reason):
            return {"name": name}

    agent = SerialAgent(FakeDevice(), "/dev/null")
    out = agent._handle(kind, body)
    assert isinstance(out, list)


@FUZZ
@given(state=json_values)
def test_store_state_parser(state):
    from edgepeft.update.store import AdapterState

    _count("store state files")
    try:
        AdapterState.from_dict(state)
    except ValueError:
        pass


def test_report_how_many_inputs_were_tried():
    print("\nhypothesis inputs tried:", json.dumps(TRIED))
    assert all(n >= 50 for n in TRIED.values()), TRIED
