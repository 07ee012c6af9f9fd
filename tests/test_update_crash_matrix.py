"""Crash consistency of an install (issue 23), as a table a reader can extend: the real agent kills
itself (SIGKILL, through the test-only ``$EDGEPEFT_TEST_CRASH_AT``, see :class:`edgepeft.fsio.CrashIO`)
at each step of an install pushed over HTTP or serial; after a restart it must serve a verified
version with the right floor, give a re-push of the same package a final answer, and install the
next version.

Each row: the crash point, the package (``good``, or ``failing``: its signed health check fails),
what is done before (``rollback``: install it, then roll it back), and after the restart: the
alpha version served, its floor, and the final status a re-push gets. Installer rows are the same
code whichever link brought the package; the serial run of them is under ``-m slow``.
"""

from __future__ import annotations

import time

import pytest
from agent_support import AgentProcess  # noqa: E402
from test_runtime_support import require_fixtures  # noqa: E402
from update_support import forge, version_of  # noqa: E402

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.errors import TransportError  # noqa: E402
from edgepeft.transport.http import HttpLink  # noqa: E402
from edgepeft.transport.link import Package, push  # noqa: E402

Q = "héllo ☃"

MATRIX = [
    # (step, crash point, package, action, served, floor, re-push)
    ("after the envelope", "envelope verified", "good", "push", 1, 1, "healthy"),
    ("after the last byte", "received", "good", "push", 2, 2, "healthy"),
    ("stage: package written, not renamed", "-> v-2.epu", "good", "push", 2, 2, "healthy"),
    ("stage: package in place, no trial", "after:-> v-2.epu", "good", "push", 2, 2, "healthy"),
    ("stage: trial state written", "after:-> state.json#1", "good", "push", 1, 1, "rejected"),
    ("during the health check", "health check", "good", "push", 1, 1, "rejected"),
    ("health check passed, not committed", "health checked", "good", "push", 1, 1, "rejected"),
    ("commit: before the state rename", "-> state.json#2", "good", "push", 1, 1, "rejected"),
    ("commit: after the state rename", "after:-> state.json#2", "good", "push", 2, 2, "healthy"),
    ("commit: committed, not yet serving", "serving", "good", "push", 2, 2, "healthy"),
    ("rollback after a failed check: before", "-> state.json#2", "failing", "push", 1, 1, "rejected"),
    ("rollback after a failed check: after", "after:-> state.json#2", "failing", "push", 1, 1, "rejected"),
    ("requested rollback: before the state rename", "-> state.json#3", "good", "rollback", 2, 2, None),
    ("requested rollback: after the state rename", "after:-> state.json#3", "good", "rollback", 1, 2, None),
]
# one row per step runs in the default suite (each restarts the agent twice); every row under -m slow
DEFAULT = {"after the envelope", "after the last byte", "stage: package in place, no trial", "during the health check",
           "commit: after the state rename", "rollback after a failed check: before",
           "requested rollback: after the state rename"}
FINAL = ("healthy", "rejected", "rolled-back")



def _failing(m):
    m["adapter"]["version"] = 2
    m["adapter"]["file"] = "adapters/alpha-2.onnx_adapter"
    m["health_checks"] = [{"adapter": "alpha", "input": "hello", "expect": {"equals": "an answer no tiny model gives"},
                           "max_new_tokens": 4}]


def _package(built, tmp_path, kind: str) -> Package:
    if kind == "good":
        return Package.read(version_of(built, tmp_path / "alpha-2.epu", 2))
    p = tmp_path / "alpha-2-failing.epu"
    p.write_bytes(forge(built["package"].read_bytes(), built["private_key"], mutate=_failing))
    return Package.read(p)


def _link(agent, line, baud, reply_timeout=2.0):
    if line is None:
        return HttpLink(agent.url, agent.token)
    from edgepeft.transport.serial_link import SerialLink

    return SerialLink(line.a, baud, reply_timeout=reply_timeout)


def _push(agent, pkg, line, baud, reply_timeout=2.0, **kw) -> dict:
    link = _link(agent, line, baud, reply_timeout)
    try:
        return push(pkg, link, **kw)
    finally:
        link.close()


def _settled(agent, id: str) -> dict | None:
    """The status of ``id`` once the agent is no longer working on it (a part complete at the crash
    is installed on start)."""
    link = HttpLink(agent.url, agent.token)
    try:
        deadline = time.monotonic() + 60
        while True:
            st = link.status(id)
            if st is None or st["status"] in FINAL + ("receiving",) or time.monotonic() > deadline:
                return st
            time.sleep(0.05)
    finally:
        link.close()


def _alpha(agent) -> tuple[int, int]:
    a = next(a for a in agent.device()["adapters"] if a["name"] == "alpha")
    return a["version"], a["floor"]


def _run(built, tmp_path, row, line=None, baud=0):
    step, point, kind, action, served, floor, repush = row
    state = tmp_path / "state"
    serial = ("--serial", line.b, "--baud", baud) if line is not None else ()
    pkg = _package(built, tmp_path, kind)
    agent = AgentProcess(built["bundle"], built["public_key"], state, *serial, env={"EDGEPEFT_TEST_CRASH_AT": point})
    try:
        if action == "rollback":
            assert _push(agent, pkg, None, 0, timeout=60)["status"] == "healthy"
            link = HttpLink(agent.url, agent.token)
            with pytest.raises(TransportError):
                link.rollback("alpha")
            link.close()
        else:
            try:  # every byte is sent, or the device goes away mid-push; it dies at the point either way
                _push(agent, pkg, line, baud, reply_timeout=0.3, wait=False, timeout=30, resume_for=0.5)
            except TransportError:
                pass
        assert agent.proc.wait(30) == -9, step  # it died at the crash point, not elsewhere
    finally:
        agent.kill()
    agent = AgentProcess(built["bundle"], built["public_key"], state, *serial)
    try:
        _settled(agent, pkg.id)
        assert _alpha(agent) == (served, floor), step
        assert agent.chat("alpha", Q)["adapter_version"] == served, step
        assert not list((state / "adapters").rglob("*.tmp")), step
        if repush is not None:
            st = _push(agent, pkg, line, baud, timeout=60)
            assert st["status"] == repush, (step, st)
            assert _alpha(agent) == ((2, 2) if repush == "healthy" else (served, floor)), step
        nxt = Package.read(version_of(built, tmp_path / "alpha-3.epu", 3))
        st = _push(agent, nxt, line, baud, timeout=60)
        assert st["status"] == "healthy" and st["version"] == 3, (step, st)
        assert _alpha(agent) == (3, 3) and agent.chat("alpha", Q)["adapter_version"] == 3, step
    finally:
        agent.stop()


@pytest.mark.parametrize("row", [pytest.param(r, id=r[0], marks=() if r[0] in DEFAULT else pytest.mark.slow)
                                 for r in MATRIX])
def test_crash_at_each_install_step_over_http(built, tmp_path, row):
    _run(built, tmp_path, row)


# the default suite runs the serial row after the last byte (the receiver's own restart path); the rest,
# with the one after the envelope (about 35 s: the sender must notice the dead line first), under -m slow
SERIAL = [pytest.param(r, id=r[0], marks=() if r[0] == "after the last byte" else pytest.mark.slow)
          for r in MATRIX if r[3] == "push"]


@pytest.mark.parametrize("row", SERIAL)
def test_crash_at_each_install_step_over_serial(built, tmp_path, row):
    from edgepeft.transport.linesim import NullModem

    baud = 1_000_000
    with NullModem(baud) as line:
        _run(built, tmp_path, row, line, baud)
