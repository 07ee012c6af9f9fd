"""Attacks on the upload protocol (issue 23, items 5-9), through real `edgepeft agent` processes on
127.0.0.1 (HTTP, and serial over a pseudo-terminal null modem): each is refused, nothing of another
client's upload is touched, and the genuine package still installs afterwards."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time

import pytest
from agent_support import AgentProcess  # noqa: E402
from test_runtime_support import require_fixtures  # noqa: E402
from update_support import forge, version_of  # noqa: E402

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.transport.http import HttpLink  # noqa: E402
from edgepeft.transport.link import Package, push  # noqa: E402

Q = "héllo ☃"



@pytest.fixture(scope="module")
def agent(built, tmp_path_factory):
    state = tmp_path_factory.mktemp("attacks") / "state"
    a = AgentProcess(built["bundle"], built["public_key"], state)
    yield a
    a.stop()


def _put(agent, id: str, body: bytes, offset: int, length: int | None = None) -> tuple[int, dict]:
    host, port = agent.url.split("//")[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Authorization": f"Bearer {agent.token}", "Upload-Offset": str(offset)}
    if length is not None:
        headers["Upload-Length"] = str(length)
    try:
        c.request("PUT", f"/v1/updates/{id}", body=body, headers=headers)
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


def _status(agent, id: str) -> dict | None:
    link = HttpLink(agent.url, agent.token)
    try:
        return link.status(id)
    finally:
        link.close()


def _push(agent, pkg: Package) -> dict:
    link = HttpLink(agent.url, agent.token)
    try:
        return push(pkg, link, timeout=60, resume_for=5)
    finally:
        link.close()


def _serving(agent) -> tuple[int, int]:
    """(version serving, floor) of adapter alpha."""
    a = next(a for a in agent.device()["adapters"] if a["name"] == "alpha")
    return a["version"], a["floor"]


def _next(agent, built, tmp_path) -> Package:
    """A genuine package one above what the device serves (never sent yet)."""
    v = _serving(agent)[1] + 1
    return Package.read(version_of(built, tmp_path / f"alpha-{v}.epu", v))


def test_garbage_under_a_genuine_id_does_not_poison_it(agent, built, tmp_path):
    """Item 6: 64 bytes of garbage under the id of a genuine package not sent yet are refused, and
    the genuine package installs afterwards (the refusal is not answered from history)."""
    pkg = _next(agent, built, tmp_path)
    for junk in (os.urandom(64), b"EPUP" + os.urandom(60), pkg.data[:pkg.envelope_bytes - 1] + b"\x00" * 9):
        code, st = _put(agent, pkg.id, junk, 0)
        assert code in (400, 422) and st.get("status", "rejected") == "rejected", (code, st)
        seen = _status(agent, pkg.id)
        assert seen is None or seen.get("retryable"), seen  # never a final answer for that id
    # the envelope of another genuine package, sent under this id: refused, not recorded either
    other = Package.read(version_of(built, tmp_path / "other.epu", _serving(agent)[1] + 7))
    code, st = _put(agent, pkg.id, other.data[:other.envelope_bytes], 0)
    assert code == 422 and "hashes to" in st["reason"], st
    st = _push(agent, pkg)
    assert st["status"] == "healthy" and st["version"] == pkg_version(pkg), st
    assert agent.chat("alpha", Q)["adapter_version"] == pkg_version(pkg)
    history = json.loads((agent.state / "history.json").read_text())
    assert all(h["id"] != pkg.id or h.get("verified") for h in history), history


def pkg_version(pkg: Package) -> int:
    from edgepeft.contracts.update import split_envelope

    return json.loads(split_envelope(pkg.data[:pkg.envelope_bytes])[0])["adapter"]["version"]


def test_another_client_cannot_delete_a_live_upload(agent, built, tmp_path):
    """Item 7: requests that contradict an upload in progress (Upload-Length 0, a length beyond the
    device's limit, another length than the signed one, more bytes than signed) are refused and the
    upload stays where it was; its sender then finishes."""
    pkg = _next(agent, built, tmp_path)
    code, st = _put(agent, pkg.id, pkg.data[:pkg.envelope_bytes], 0, pkg.size)
    assert code == 200 and st["offset"] == pkg.envelope_bytes
    part = agent.state / "incoming" / f"{pkg.id}.part"
    for offset, body, length in [(0, b"", 0), (pkg.envelope_bytes, b"x", 0), (0, b"", 2 ** 63),
                                 (pkg.envelope_bytes, b"x", 2 ** 40), (pkg.envelope_bytes, b"x", pkg.size + 1),
                                 (pkg.envelope_bytes, b"x" * (pkg.size - pkg.envelope_bytes + 1), None),
                                 (pkg.envelope_bytes, b"x", -5)]:
        code, st = _put(agent, pkg.id, body, offset, length)
        assert 400 <= code < 500, (length, code, st)
        assert part.stat().st_size == pkg.envelope_bytes, length
        now = _status(agent, pkg.id)
        assert now["status"] == "receiving" and now["offset"] == pkg.envelope_bytes, (length, now)
    st = _push(agent, pkg)
    assert st["status"] == "healthy" and st["version"] == pkg_version(pkg), st
    assert not part.exists()


def test_a_signed_size_beyond_the_device_limit_is_refused_before_a_byte(agent, built, tmp_path):
    """Item 8: a package whose signed payload size is 100 GiB (no Upload-Length) is refused once its
    envelope is read; nothing stays in incoming/, the device serves what it served."""
    before = _serving(agent)
    v = before[1] + 1

    def huge(m):
        m["adapter"]["version"] = v
        m["payload"]["size"] = 100 << 30
    data = forge(built["package"].read_bytes(), built["private_key"], mutate=huge, fix_payload_fields=False)
    from edgepeft.contracts.update import envelope_length

    n = envelope_length(data)
    id = hashlib.sha256(data[:n]).hexdigest()
    code, st = _put(agent, id, data[:n + 100], 0)
    assert code == 422 and st["status"] == "rejected", (code, st)
    assert "signed size" in st["reason"] and "at most" in st["reason"], st
    assert not (agent.state / "incoming" / f"{id}.part").exists()
    assert _serving(agent) == before


def test_idle_partial_uploads_do_not_starve_a_real_push(agent, built, tmp_path):
    """Item 9: four 8-byte partial uploads (and more) never make a genuine push wait: the oldest idle
    part that never showed a verified envelope gives its slot to the new upload."""
    ids = [hashlib.sha256(os.urandom(16)).hexdigest() for _ in range(6)]
    for id in ids:
        code, st = _put(agent, id, b"EPUP\x00\x01\x00\x00", 0)
        assert code == 200 and st["status"] == "receiving", st
    assert len(agent.device()["uploads"]) <= 4  # the table stays bounded
    pkg = _next(agent, built, tmp_path)
    code, st = _put(agent, pkg.id, pkg.data[:pkg.envelope_bytes], 0, pkg.size)
    assert code == 200, (code, st)
    st = _push(agent, pkg)
    assert st["status"] == "healthy" and st["version"] == pkg_version(pkg), st


def test_complete_parts_left_by_crashes_are_installed_on_restart(built, tmp_path):
    """Item 5: the agent killed (SIGKILL) after the last byte of four packages leaves four complete
    parts; on restart each is verified and installed or refused (never left `receiving`), they take
    no upload slot, and a later push completes."""
    state = tmp_path / "state"
    agent = AgentProcess(built["bundle"], built["public_key"], state)
    pkgs = [Package.read(version_of(built, tmp_path / f"alpha-{v}.epu", v)) for v in (2, 3, 4, 5)]
    try:
        for pkg in pkgs[:1]:  # one for real through the test-only crash point, the others as it leaves them
            agent.kill()
            agent = AgentProcess(built["bundle"], built["public_key"], state,
                                 env={"EDGEPEFT_TEST_CRASH_AT": "received"})
            link = HttpLink(agent.url, agent.token)
            try:
                push(pkg, link, timeout=20, resume_for=1)
            except Exception:
                pass
            finally:
                link.close()
            assert agent.proc.wait(20) == -9  # killed itself after the last byte
        part = state / "incoming" / f"{pkgs[0].id}.part"
        assert part.stat().st_size == pkgs[0].size
        for pkg in pkgs[1:]:
            (state / "incoming" / f"{pkg.id}.part").write_bytes(pkg.data)
        # a folder and a link named like parts (an app that could write there): never read, never fatal
        (state / "incoming" / f"{'d' * 64}.part").mkdir()
        (state / "incoming" / f"{'e' * 64}.part").symlink_to(pkgs[0].path)
        agent.kill()
        agent = AgentProcess(built["bundle"], built["public_key"], state)
        for pkg in pkgs:
            st = _wait(agent, pkg.id)
            assert st["status"] in ("healthy", "rejected"), st
        assert _serving(agent) == (5, 5)
        assert agent.chat("alpha", Q)["adapter_version"] == 5
        assert [p.name[:4] for p in (state / "incoming").glob("*.part")] == ["dddd"] and pkgs[0].path.exists()
        assert _push(agent, pkgs[-1])["status"] == "healthy"  # answered from the verified history
        new = Package.read(version_of(built, tmp_path / "alpha-6.epu", 6))
        st = _push(agent, new)
        assert st["status"] == "healthy" and st["version"] == 6, st
    finally:
        agent.stop()


def _wait(agent, id: str, seconds: float = 60.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        st = _status(agent, id)
        if st is not None and st.get("status") in ("healthy", "rejected", "rolled-back"):
            return st
        time.sleep(0.05)
    raise AssertionError(f"{id[:12]} never finished: {_status(agent, id)}")


def test_serial_garbage_and_a_huge_total_neither_poison_nor_delete(built, tmp_path):
    """Items 6 and 7 over serial (no token): garbage DATA under a genuine id, and a QUERY announcing
    2^63 bytes for an upload in progress: refused, the upload kept, the genuine package installs."""

    import serial

    from edgepeft.transport import serial_proto as sp
    from edgepeft.transport.framing import FrameDecoder, encode_frame
    from edgepeft.transport.linesim import NullModem
    from edgepeft.transport.serial_link import SerialLink

    baud = 1_000_000
    with NullModem(baud) as line:
        agent = AgentProcess(built["bundle"], built["public_key"], tmp_path / "state", "--serial", line.b,
                             "--baud", baud)
        port = serial.Serial(line.a, baud, timeout=0.05)
        dec = FrameDecoder()

        def ask(kind, body, want):
            for _ in range(10):  # sent again each second: the agent may still be opening its port
                port.write(encode_frame(kind, body))
                deadline = time.monotonic() + 1
                while time.monotonic() < deadline:
                    for k, b in dec.feed(port.read(4096)):
                        if k == want:
                            return b
            raise AssertionError("no answer on the serial line")
        try:
            pkg = Package.read(version_of(built, tmp_path / "alpha-2.epu", 2))
            raw = bytes.fromhex(pkg.id)
            ask(sp.QUERY, sp.query(pkg.id, 64), sp.REPLY)
            ack = ask(sp.DATA, sp.data(raw[:8], 0, os.urandom(64)), sp.ACK)
            assert sp.STATE_NAMES[sp.ACK_BODY.unpack(ack)[2]] == "rejected"
            # an upload in progress (its envelope over HTTP), then a QUERY for 2^63 bytes and a chunk
            code, st = _put(agent, pkg.id, pkg.data[:pkg.envelope_bytes], 0, pkg.size)
            assert code == 200, st
            ask(sp.QUERY, sp.query(pkg.id, 2 ** 64 - 1), sp.REPLY)
            ask(sp.QUERY, sp.query(pkg.id, 2 ** 63), sp.REPLY)
            port.write(encode_frame(sp.DATA, sp.data(raw[:8], pkg.envelope_bytes, b"zz")))
            ask(sp.INFO, b"", sp.REPLY)  # frames are handled in order: the DATA frame was handled
            part = agent.state / "incoming" / f"{pkg.id}.part"
            assert part.stat().st_size == pkg.envelope_bytes
            now = _status(agent, pkg.id)
            assert now["status"] == "receiving" and now["offset"] == pkg.envelope_bytes, now
            port.close()
            link = SerialLink(line.a, baud)
            try:
                st = push(pkg, link, timeout=120)
            finally:
                link.close()
            assert st["status"] == "healthy" and st["version"] == 2, st
        finally:
            if port.is_open:
                port.close()
            agent.stop()
