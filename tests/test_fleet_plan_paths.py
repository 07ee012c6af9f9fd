"""A plan in a subfolder, the layout of docs/fleet.md, driven from the command line and from Python: every
path is resolved once, against the file that names it; a rollout that cannot start is recorded FAILED with
the reason; `abort` always ends in a final state (issue 26, item 2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from agent_support import AgentProcess  # noqa: E402
from fleet_support import free_port  # noqa: E402
from test_runtime_support import require_fixtures  # noqa: E402

require_fixtures()



def _layout(root: Path, package: Path, address: str, token_file: str | None = None) -> None:
    """fleet/plan.toml and fleet/inventory.toml; the package in updates/ (named ../updates/x.epu by the plan)."""
    (root / "fleet").mkdir(parents=True)
    (root / "updates").mkdir()
    shutil.copy(package, root / "updates" / "x.epu")
    (root / "fleet" / "inventory.toml").write_text(
        f'[[device]]\nid = "pi-001"\naddress = "{address}"\n' + (f'token_file = "{token_file}"\n' if token_file else ""))
    (root / "fleet" / "plan.toml").write_text(
        'name = "bakery"\ninventory = "inventory.toml"\npackages = ["../updates/x.epu"]\n')


def _cli(cwd: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepeft", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=os.environ | {"EDGEPEFT_DEBUG": ""})


def test_a_plan_in_a_subfolder_rolls_out_from_the_command_line(built, tmp_path):
    agent = AgentProcess(built["bundle"], built["public_key"], tmp_path / "state")
    try:
        _layout(tmp_path / "work", built["package"], agent.url, str(agent.state / "token"))
        r = _cli(tmp_path / "work", "rollout", "start", "fleet/plan.toml", "--db", "fleet/r.sqlite")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "SUCCEEDED" in r.stdout and "fleet/fleet" not in r.stdout + r.stderr
    finally:
        agent.stop()


def test_a_rollout_that_cannot_start_is_failed_and_abort_always_ends(built, tmp_path, monkeypatch):
    from edgepeft.errors import EdgePeftError
    from edgepeft.fleet.controller import Rollout, start_rollout
    from edgepeft.fleet.state import RolloutDB

    work = tmp_path / "work"
    _layout(work, built["package"], f"http://127.0.0.1:{free_port()}")
    monkeypatch.chdir(work)
    db = Path("fleet/r.sqlite")
    first = start_rollout("fleet/plan.toml", db, log=lambda m: None)  # the Python API, the same layout
    second = start_rollout("fleet/plan.toml", db, log=lambda m: None)
    first._pool.shutdown()
    second._pool.shutdown()
    (work / "updates" / "x.epu").unlink()  # the package went away before the controller ran
    with pytest.raises(EdgePeftError):
        Rollout(RolloutDB(db), first.id)
    row = RolloutDB(db).rollout(first.id)
    assert row["status"] == "FAILED" and "x.epu" in row["reason"], row
    r = _cli(work, "rollout", "resume", first.id, "--db", db)
    assert r.returncode != 0 and "x.epu" in r.stderr
    r = _cli(work, "rollout", "abort", second.id, "--db", db)
    assert r.returncode == 0, r.stderr
    row = RolloutDB(db).rollout(second.id)
    assert row["status"] == "ABORTED" and "x.epu" in row["reason"], row
    assert "ABORTED" in r.stdout
