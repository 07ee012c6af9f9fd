"""Hostile input to the serial link and the pull index, fuzzed with hypothesis: the frame decoder after any
noise, the device agent's serial command handler on a real Device (every message type, structured and
random bodies, forged rollbacks), and the TUF index parser. Only edgepeft's own errors come out, the
line resynchronizes on the next frame, and what the device serves (versions, floors, store files) is
unchanged. Bounded here (a few seconds each); ``-m slow`` runs many more examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from attack_support import store_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_runtime_support import require_fixtures

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.contracts.names import is_id, is_name  # noqa: E402
from edgepeft.errors import TransportError  # noqa: E402
from edgepeft.transport import serial_proto as sp  # noqa: E402
from edgepeft.transport.framing import MAX_FRAME, FrameDecoder, encode_frame  # noqa: E402
from edgepeft.transport.tuf_pull import parse_index  # noqa: E402

QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
LONG = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])



# -- frames ------------------------------------------------------------------------------------------
frames_st = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=400)), min_size=1, max_size=5)
noise_st = st.binary(max_size=3000) | st.binary(max_size=40, min_size=1).map(lambda b: b * 1200) \
    | st.integers(1, 255).map(lambda c: bytes([c]) * (2 * MAX_FRAME + 7))


def _resync(noise: bytes, frames, cut: int) -> None:
    stream = noise + b"".join(encode_frame(k, b) for k, b in frames)
    dec = FrameDecoder()
    got = []
    for i in range(0, len(stream), cut):
        got += list(dec.feed(stream[i:i + cut]))
    assert got[len(got) - len(frames):] == frames  # whatever came before, every frame after it arrives


@QUICK
@given(noise=noise_st, frames=frames_st, cut=st.integers(1, 5000))
def test_the_decoder_resynchronizes_on_the_next_frame_after_any_noise(noise, frames, cut):
    _resync(noise, frames, cut)


@pytest.mark.slow
@LONG
@given(noise=noise_st, frames=frames_st, cut=st.integers(1, 5000))
def test_the_decoder_resynchronizes_long(noise, frames, cut):
    _resync(noise, frames, cut)


# -- the device's serial command handler -------------------------------------------------------------
@pytest.fixture(scope="module")
def device_agent(built, tmp_path_factory):
    from edgepeft.transport.serial_agent import SerialAgent
    from edgepeft.update.device import Device

    state = tmp_path_factory.mktemp("fuzz-serial") / "state"
    device = Device(built["bundle"], [built["public_key"]], state)
    assert device.install(Path(built["package"]).read_bytes()).status == "healthy"  # v2: a rollback would show
    logged: list[str] = []
    agent = SerialAgent(device, "/dev/null", token="the-device-token-" + "x" * 20, log=logged.append)
    yield device, agent, logged
    device.close()


names = st.sampled_from(["alpha", "beta", "bundle", "", "..", "alpha\n", "../x"]) | st.text(max_size=20)
message_st = st.one_of(
    st.tuples(st.integers(0, 255), st.binary(max_size=200)),
    st.tuples(st.just(sp.QUERY), st.builds(lambda i, t: sp.QUERY_BODY.pack(i, t), st.binary(min_size=32, max_size=32),
                                           st.integers(0, (1 << 64) - 1))),
    st.tuples(st.just(sp.DATA), st.builds(lambda i, o, c: sp.DATA_HEAD.pack(i, o) + c, st.binary(min_size=8, max_size=8),
                                          st.integers(0, (1 << 32) - 1), st.binary(max_size=300))),
    st.tuples(st.just(sp.ROLLBACK), st.builds(lambda n, m, name: n + m + name.encode("utf-8", "surrogatepass"),
                                              st.binary(min_size=16, max_size=16), st.binary(min_size=32, max_size=32),
                                              names)),
    st.tuples(st.just(sp.ROLLBACK), names.map(lambda n: n.encode("utf-8", "surrogatepass"))),
    st.tuples(st.just(sp.CHALLENGE), st.binary(max_size=4)),
    st.tuples(st.just(sp.INFO), st.binary(max_size=4)),
)


def _serving(device) -> dict:
    st_ = device.status()
    return {"adapters": [(a["name"], a["version"], a["floor"], a["previous"]) for a in st_["adapters"]],
            "bundle": st_["bundle"]}


def _handler(device_agent, messages, forge_with_nonce: bool) -> None:
    device, agent, logged = device_agent
    before, files = _serving(device), store_snapshot(device.state_dir)
    for kind, body in messages:
        if forge_with_nonce and kind == sp.ROLLBACK and len(body) > 48:
            # a real challenge, a MAC made without the token
            nonce = bytes.fromhex(json.loads(_challenge(agent))["nonce"])
            body = nonce + body[16:]
        out = agent.handle(kind, body)
        assert isinstance(out, list) and all(isinstance(f, bytes) and f.endswith(b"\x00") for f in out)
    assert agent.failures == 0, logged[-3:]
    assert _serving(device) == before and store_snapshot(device.state_dir) == files
    assert agent.describe()["sessions"] <= agent.describe()["max_sessions"]


def _challenge(agent) -> str:
    """Ask the agent for a challenge and decode its answer frame (trusting nothing but the decoder)."""
    dec = FrameDecoder()
    frames = [f for frame in agent.handle(sp.CHALLENGE, b"") for f in dec.feed(frame)]
    return frames[0][1][1:].decode("utf-8")


@QUICK
@given(messages=st.lists(message_st, max_size=12), forge=st.booleans())
def test_serial_commands_change_nothing_without_a_signed_package_or_the_token(device_agent, messages, forge):
    _handler(device_agent, messages, forge)


@pytest.mark.slow
@LONG
@given(messages=st.lists(message_st, max_size=30), forge=st.booleans())
def test_serial_commands_long(device_agent, messages, forge):
    _handler(device_agent, messages, forge)


# -- the TUF index -----------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=5),
                           max_leaves=20)
GOOD = {"path": "edgepeft/adapters/alpha/v2.epu", "type": "adapter", "name": "alpha", "version": 2,
        "base_fingerprint": "sha256:" + "ab" * 32, "id": "cd" * 32, "expires": None}
entry_st = st.builds(lambda edits: {**GOOD, **edits},
                     st.dictionaries(st.sampled_from(sorted(GOOD) + ["extra"]),
                                     json_values | st.sampled_from(["../../../victim", "../../adapters/alpha/v-8",
                                                                    "alpha\n", "cd" * 32 + "\n", "/etc/passwd",
                                                                    "2020-01-01T00:00:00Z", 2 ** 63, True]),
                                     max_size=3))
index_st = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.lists(entry_st | json_values, max_size=6).map(lambda p: json.dumps({"schema_version": 1, "packages": p}).encode()),
)


def _index(raw: bytes) -> None:
    try:
        entries, problems = parse_index(raw)
    except TransportError as exc:
        assert "index.json" in exc.message
        return
    for e in entries:
        assert is_id(e.id) and is_name(e.name) and e.type in ("adapter", "bundle")
        assert isinstance(e.version, int) and not isinstance(e.version, bool) and e.version >= 1
        assert not e.path.startswith("/") and ".." not in e.path.split("/") and "\n" not in e.path
    assert all(isinstance(p, str) for p in problems)


@QUICK
@given(raw=index_st)
def test_index_parser_takes_only_well_formed_entries(raw):
    _index(raw)


@pytest.mark.slow
@LONG
@given(raw=index_st)
def test_index_parser_long(raw):
    _index(raw)
