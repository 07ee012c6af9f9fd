"""Issue 23 item 13 and the state-folder rollback ("Also seen"), through the real agent: an unreadable or
tampered state file never stops the device. It comes up serving what still verifies (the shipped
bundle at worst), the bad file is moved aside (kept as evidence) and reported in /v1/device, the floor
does not go down, and the next update installs."""

from __future__ import annotations

import json
import shutil

import pytest
from agent_support import AgentProcess  # noqa: E402
from test_runtime_support import require_fixtures  # noqa: E402
from update_support import version_of  # noqa: E402

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.transport.http import HttpLink  # noqa: E402
from edgepeft.transport.link import Package, push  # noqa: E402

Q = "héllo ☃"



@pytest.fixture(scope="module")
def installed(built, tmp_path_factory):
    """A state folder where alpha v2 then v3 were installed (the agent stopped), and the captured v2."""
    root = tmp_path_factory.mktemp("recovery")
    agent = AgentProcess(built["bundle"], built["public_key"], root / "state")
    try:
        for v in (2, 3):
            st = _push(agent, Package.read(version_of(built, root / f"alpha-{v}.epu", v)))
            assert st["status"] == "healthy", st
    finally:
        agent.stop()
    return root


def _push(agent, pkg):
    link = HttpLink(agent.url, agent.token)
    try:
        return push(pkg, link, timeout=60)
    finally:
        link.close()


def _alpha(dev):
    return next(a for a in dev["adapters"] if a["name"] == "alpha")


def _truncate(p):
    p.write_bytes(p.read_bytes()[:17])


def _non_integer(p):
    p.write_text(json.dumps(json.loads(p.read_text()) | {"current": "three"}))


def _garbage(p):
    p.write_bytes(b"\x00\xff{{[" * 40)


def _deep(p):
    p.write_text("[" * 100000)


def _roll_back_to_captured(p):
    """A local user without the key: point the state at the captured older package and lower the floor."""
    data = json.loads(p.read_text())
    data.update(current=2, previous=None, floor=2)
    p.write_text(json.dumps(data))
    shutil.copy(p.parent.parent.parent.parent / "alpha-2.epu", p.parent / "v-2.epu")


# (file in the state folder, damage, alpha version served after the restart, alpha floor, bundle floor)
CASES = {
    "state.json truncated": ("adapters/alpha/state.json", _truncate, 1, 3),
    "state.json non-integer version": ("adapters/alpha/state.json", _non_integer, 1, 3),
    "state.json nested too deep": ("adapters/alpha/state.json", _deep, 1, 3),
    "state.json edited to a captured older package": ("adapters/alpha/state.json", _roll_back_to_captured, 1, 3),
    "bundle.json garbage": ("bundle.json", _garbage, 3, 3),
    "history.json garbage": ("history.json", _garbage, 3, 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_state_file_is_quarantined_and_reported_and_the_device_serves(built, installed, tmp_path, case):
    rel, damage, serves, floor = CASES[case]
    state = tmp_path / "state"
    shutil.copytree(installed / "state", state)
    shutil.copy(installed / "alpha-2.epu", tmp_path / "alpha-2.epu")
    bad = state / rel
    damage(bad)
    agent = AgentProcess(built["bundle"], built["public_key"], state)
    try:
        assert agent.chat("alpha", Q)["adapter_version"] == serves
        dev = agent.device()
        assert (_alpha(dev)["version"], _alpha(dev)["floor"]) == (serves, floor), _alpha(dev)
        moved = list(bad.parent.glob(f"{bad.name}.bad-*"))
        assert len(moved) == 1, list(bad.parent.iterdir())
        assert any(bad.name in n and moved[0].name in n for n in dev["notes"]), dev["notes"]
        # nothing at or below the floor installs (the captured package included); the next version does
        old = _push(agent, Package.read(tmp_path / "alpha-2.epu"))
        assert old["status"] == "rejected" or "finished" in old, old  # refused, or its earlier result
        assert agent.chat("alpha", Q)["adapter_version"] == serves
        st = _push(agent, Package.read(version_of(built, tmp_path / "alpha-4.epu", 4)))
        assert st["status"] == "healthy" and st["version"] == 4, st
        assert agent.chat("alpha", Q)["adapter_version"] == 4
    finally:
        agent.stop()
