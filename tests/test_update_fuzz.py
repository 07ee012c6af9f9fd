"""Parsers of hostile bytes, fuzzed with hypothesis: the update envelope, serial frames and protocol
messages, the device's store state. Only edgepeft's own errors may come out, never a crash.

Each test reports how many inputs it tried (``pytest -s`` prints them; bounded for the default suite).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepeft.contracts.update import HEADER, MAGIC, encode_envelope, metadata_bytes, verify_envelope
from edgepeft.errors import EdgePeftError
from edgepeft.transport.framing import FrameDecoder, cobs_decode, cobs_encode, encode_frame

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRIED: dict[str, int] = {}


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    from edgepeft.contracts.signing import generate_keypair, load_private_key

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
    from edgepeft.contracts.signing import sign_bytes

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
    from edgepeft.transport.serial_agent import SerialAgent

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
    out = agent.handle(kind, body)
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


def _manifest(key, files: dict[str, bytes] | None = None, **edits) -> dict:
    """A valid signed bundle manifest listing ``files`` (path -> content), with top-level ``edits``."""
    from edgepeft.contracts.names import sha256_bytes
    from edgepeft.contracts.signing import sign_manifest

    files = files if files is not None else {"model.onnx": b"graph", "adapters/a-1.onnx_adapter": b"ad"}
    data = {
        "schema_version": 1, "kind": "bundle", "edgepeft_version": "0.2.0", "created": "2026-11-22T00:00:00Z",
        "base": {"name": "tiny", "fingerprint": "sha256:ab", "task": "causal-lm", "architecture": "llama"},
        "target": {"name": "x"}, "quantization": {"weights": "int4"}, "model": {"graph": "model.onnx"},
        "tokenizer": {"file": "tokenizer.json"}, "generation": {},
        "files": [{"path": p, "size": len(b), "sha256": sha256_bytes(b)} for p, b in files.items()],
        "adapters": [{"name": "a", "version": 1, "file": "adapters/a-1.onnx_adapter", "method": "lora", "rank": 4,
                      "alpha": 8.0, "base_fingerprint": "sha256:ab"}] if "adapters/a-1.onnx_adapter" in files else [],
        "health_checks": [{"input": "hi", "expect": {"contains": "x"}}], "merged_adapter": None,
    }
    data.update(edits)
    return sign_manifest(data, key[0])


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(["schema_version", "kind", "base", "target", "model", "files",
                                              "adapters", "health_checks", "generation", "merged_adapter",
                                              "tokenizer", "signature", "extra"]), json_values, max_size=3),
       inner=st.tuples(st.sampled_from(["files", "adapters", "health_checks", "base", "model"]),
                       st.dictionaries(st.text(max_size=10) | st.sampled_from(["path", "size", "sha256", "name",
                                                                               "version", "file", "expect", "graph",
                                                                               "task", "key_id", "rank"]),
                                       json_values, max_size=3)))
def test_signed_but_malformed_manifest_gives_a_spec_or_bundle_error(key, tmp_path_factory, edits, inner):
    """A manifest signed by a trusted key but wrong in any field, of any type: a typed error naming
    the file (and the field), never an AttributeError/TypeError from deep inside."""
    from edgepeft.contracts.verify import verify_bundle

    _count("manifest: signed, malformed fields")
    where, changes = inner
    base = _manifest(key)
    target = base[where][0] if isinstance(base[where], list) and base[where] else base[where]
    if isinstance(target, dict):
        target.update(changes)
    base.pop("signature")
    base.update(edits)
    from edgepeft.contracts.signing import sign_manifest

    try:
        signed = sign_manifest(base, key[0])
        text = json.dumps(signed)
    except (TypeError, ValueError):
        return  # not representable as canonical JSON: a build never writes it
    d = tmp_path_factory.mktemp("m")
    (d / "manifest.json").write_text(text)
    try:
        m = verify_bundle(d, [key[1]], check_files=False)
    except EdgePeftError as exc:
        assert "manifest.json" in str(exc) or "signature" in str(exc).lower() or "signed" in str(exc), exc
        return
    assert m.base["name"] and m.files


@FUZZ
@given(raw=st.binary(max_size=400) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
       | json_values.map(lambda v: json.dumps(v).encode()))
def test_manifest_bytes_of_any_kind(key, tmp_path_factory, raw):
    from edgepeft.contracts.verify import verify_bundle

    _count("manifest: any bytes")
    d = tmp_path_factory.mktemp("raw")
    (d / "manifest.json").write_bytes(raw)
    with pytest.raises(EdgePeftError):
        verify_bundle(d, [key[1]])


_NAMES = st.sampled_from(["model.onnx", "adapters/a-1.onnx_adapter", "manifest.json", ".", "..", "a", "a/b", "/abs",
                          "../x", "adapters", "adapters/", "./model.onnx", "a//b", "a\\b", "x\x00y", "tokenizer.json"])
_MEMBER = st.tuples(_NAMES | st.text(alphabet="ab/.", max_size=6),
                    st.sampled_from(["file", "file", "file", "dir", "symlink", "hardlink", "fifo"]),
                    st.binary(max_size=40))


@FUZZ
@given(members=st.lists(_MEMBER, max_size=6), listed=st.booleans(), cut=st.none() | st.integers(0, 4000))
def test_archive_unpacker_and_reader_on_hostile_tars(key, tmp_path_factory, members, listed, cut):
    """Any member list (links, folders, duplicates, a file and a folder of one name, unlisted files),
    whole or cut short: only edgepeft's errors, nothing outside the destination, nothing left on failure,
    and on success exactly the manifest's files."""
    import io
    import tarfile

    from edgepeft.contracts.archive import unpack_bundle
    from edgepeft.contracts.verify import verify_bundle

    _count("archive: hostile members")
    d = tmp_path_factory.mktemp("tar")
    files = {n: b for n, kind, b in members if kind == "file" and n != "manifest.json"} if listed else None
    try:
        manifest = json.dumps(_manifest(key, files) if files or not listed else _manifest(key)).encode()
    except EdgePeftError:
        manifest = b"{}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, body in [("manifest.json", "file", manifest)] + members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    data = buf.getvalue() if cut is None else buf.getvalue()[:cut]
    archive = d / "b.epb"
    archive.write_bytes(data)
    dest = d / "out" / "bundle"
    try:
        unpack_bundle(archive, dest)
    except EdgePeftError:
        assert not dest.exists()
    else:
        got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
        want = sorted(f["path"] for f in json.loads(manifest)["files"]) + ["manifest.json"]
        assert got == sorted(want)
    assert sorted(p.name for p in (d / "out").iterdir()) in ([], ["bundle"]) if (d / "out").exists() else True
    assert {p.name for p in d.iterdir()} <= {"b.epb", "out"}  # nothing written outside the destination
    try:
        verify_bundle(archive, [key[1]])
    except EdgePeftError:
        pass


def test_report_how_many_inputs_were_tried():
    print("\nhypothesis inputs tried:", json.dumps(TRIED))
    assert all(n >= 50 for n in TRIED.values()), TRIED
