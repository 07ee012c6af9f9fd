"""Attacks on the serial update link, through a real `edgepeft agent` on one end of a pseudo-terminal null
modem and a hostile (or honest) host on the other: a rollback without the device token, a flood of
sessions, noise on the line, a package name with a trailing newline. Each is refused; the device keeps
serving what it served, and an honest host still gets its work done."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from agent_support import AgentProcess, run_cli
from attack_support import SerialClient, store_snapshot, wait_for
from test_runtime_support import require_fixtures
from update_support import forge, version_of

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.transport import serial_proto as sp  # noqa: E402
from edgepeft.transport.framing import encode_frame  # noqa: E402
from edgepeft.transport.linesim import NullModem  # noqa: E402

Q = "héllo ☃"
BAUD = 921600



@pytest.fixture()
def line_agent(built, tmp_path):
    with NullModem(BAUD) as line:
        agent = AgentProcess(built["bundle"], built["public_key"], tmp_path / "state", "--serial", line.b,
                             "--baud", BAUD)
        client = SerialClient(line.a, BAUD)
        try:
            yield line, agent, client
        finally:
            client.close()
            agent.stop()


def _serving(agent) -> int:
    return agent.chat("alpha", Q)["adapter_version"]


def _push(pkg, line, *extra):
    r = run_cli("push", pkg, "--to", f"serial://{line.a}?baud={BAUD}", "--json", *extra, timeout=180)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else {"stderr": r.stderr}


def test_serial_rollback_needs_the_device_token(built, line_agent, tmp_path):
    line, agent, client = line_agent
    assert _push(built["package"], line)[1]["status"] == "healthy"
    assert _serving(agent) == 2
    before = store_snapshot(agent.state)
    # a bare ROLLBACK frame (the old protocol: just a name), then one with a MAC made with a guessed token
    answer = client.ask(sp.ROLLBACK, b"alpha")
    assert answer and "error" in answer and "token" in answer["error"]["message"], answer
    challenge = client.ask(sp.CHALLENGE)
    nonce = bytes.fromhex(challenge["nonce"])
    forged = sp.rollback_request(nonce, "alpha", "not-the-device-token-at-all")
    answer = client.ask(sp.ROLLBACK, forged)
    assert answer and "error" in answer, answer
    # a request made with the real token for another adapter, its name then changed: the MAC covers the name
    token = (agent.state / "token").read_text().strip()
    nonce = bytes.fromhex(client.ask(sp.CHALLENGE)["nonce"])
    other = sp.rollback_request(nonce, "beta", token)
    answer = client.ask(sp.ROLLBACK, other[:-len(b"beta")] + b"alpha")
    assert answer and "error" in answer, answer
    assert _serving(agent) == 2 and store_snapshot(agent.state) == before
    # the honest host holds the token (its --token-file) and rolls back over the same line
    r = run_cli("adapters", "rollback", "alpha", "--device", f"serial://{line.a}?baud={BAUD}",
                "--token-file", agent.state / "token", "--json", timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    assert json.loads(r.stdout)["rolled_back_from"] == 2
    assert _serving(agent) == 1
    # without the token the host is told what to pass, and nothing is sent
    r = run_cli("adapters", "rollback", "alpha", "--device", f"serial://{line.a}?baud={BAUD}", timeout=60,
                env={"EDGEPEFT_DEVICE_TOKEN": ""})
    assert r.returncode != 0 and "token" in r.stderr


def test_a_captured_serial_rollback_cannot_be_replayed(built, line_agent, tmp_path):
    line, agent, client = line_agent
    token = (agent.state / "token").read_text().strip()
    assert _push(built["package"], line)[1]["status"] == "healthy"
    assert _push(version_of(built, tmp_path / "alpha-3.epu", 3), line)[1]["status"] == "healthy"
    nonce = bytes.fromhex(client.ask(sp.CHALLENGE)["nonce"])
    frame = sp.rollback_request(nonce, "alpha", token)  # what a sniffer on the line records
    answer = client.ask(sp.ROLLBACK, frame)
    assert answer.get("rolled_back_from") == 3 and _serving(agent) == 2, answer
    assert client.ask(sp.ROLLBACK, frame) == answer  # a resend (lost answer) gets the same answer, nothing more
    assert _serving(agent) == 2
    assert _push(version_of(built, tmp_path / "alpha-4.epu", 4), line)[1]["status"] == "healthy"
    for _ in range(sp.MAX_NONCES + 1):
        client.ask(sp.CHALLENGE)  # later challenges push the used one out of the device's memory
    answer = client.ask(sp.ROLLBACK, frame)
    assert "error" in answer, answer
    assert _serving(agent) == 4


def test_serial_sessions_are_bounded(built, line_agent, tmp_path):
    """20,000 QUERY frames with random ids grew the agent's memory without bound; now the sessions kept are
    capped (least recently used go first), and an honest push afterwards still completes."""
    line, agent, client = line_agent
    rng = random.Random(12)
    for i in range(2000):
        client.send(sp.QUERY, sp.QUERY_BODY.pack(rng.randbytes(32), rng.randrange(1, 1 << 20)))
        if i % 40 == 39:
            client.frames(0.01)  # drain the answers so the line never backs up
    info = wait_for(lambda: client.ask(sp.INFO), timeout=60)
    serial = info["links"]["serial"]
    assert serial["sessions"] <= serial["max_sessions"] <= 16, serial
    assert _push(built["package"], line)[1]["status"] == "healthy"
    assert _serving(agent) == 2


def test_noise_on_the_line_does_not_silence_the_device(built, line_agent, tmp_path):
    """After noise, the very next request is answered: a frame glued to the noise's last bytes was lost before."""
    line, agent, client = line_agent
    rng = random.Random(16)
    for noise in (rng.randbytes(64 << 10), bytes(rng.randrange(1, 256) for _ in range(40 << 10)),
                  b"\xff" * (40 << 10), encode_frame(sp.INFO)[:-1]):
        client.raw(noise + b"\x01")  # random bytes, long runs with no delimiter, a frame cut short
        client.send(sp.INFO)  # once, no retry
        got = wait_for(lambda: [b for k, b in client.frames(0.2) if k == sp.REPLY and b[:1] == bytes([sp.INFO])],
                       timeout=30)
        assert got and json.loads(got[0][1:])["adapters"], "the device did not answer INFO after noise"
    assert _push(built["package"], line)[1]["status"] == "healthy"
    assert _serving(agent) == 2


def test_a_name_with_a_trailing_newline_is_refused(built, line_agent, tmp_path):
    line, agent, client = line_agent

    def newline_name(m):
        m["adapter"]["name"] = "alpha\n"
        m["adapter"]["version"] = 7
    bad = tmp_path / "newline.epu"
    bad.write_bytes(forge(Path(built["package"]).read_bytes(), built["private_key"], mutate=newline_name))
    rc, st = _push(bad, line)
    assert rc != 0 and st["status"] == "rejected" and "name" in st["reason"], st
    assert not any("\n" in p.name for p in agent.state.rglob("*"))
    assert _serving(agent) == 1
