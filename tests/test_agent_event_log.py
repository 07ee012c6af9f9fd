"""The agent says what happens (issue 26, item 8): one line per install, rejection, rollback and request on
stderr, as text or with --log-json as JSON objects; `status` names a refused package by its id."""

from __future__ import annotations

import json

from agent_support import AgentProcess, run_cli  # noqa: E402
from test_runtime_support import require_fixtures  # noqa: E402
from update_support import forge  # noqa: E402

require_fixtures()



def _log(agent) -> str:
    return (agent.state.parent / f"{agent.state.name}.agent.log").read_text(errors="replace")


def _stranger_package(built, tmp_path):
    from edgepeft.contracts.signing import generate_keypair

    stranger, _ = generate_keypair(tmp_path / "stranger")
    bad = tmp_path / "bad.epu"
    bad.write_bytes(forge(built["package"].read_bytes(), stranger,
                          mutate=lambda m: m["adapter"].update(version=9)))
    return bad


def test_every_event_is_one_line(built, tmp_path):
    agent = AgentProcess(built["bundle"], built["public_key"], tmp_path / "state")
    try:
        dev = ["--to", agent.url, "--token-file", agent.state / "token"]
        assert run_cli("push", built["package"], *dev).returncode == 0
        assert run_cli("push", built["package"], *dev).returncode == 0
        assert run_cli("push", _stranger_package(built, tmp_path), *dev).returncode != 0
        agent.chat("alpha", "hello")
        r = run_cli("adapters", "rollback", "alpha", "--device", agent.url, "--token-file", agent.state / "token")
        assert r.returncode == 0, r.stderr
        r = run_cli("status", "--device", agent.url, "--token-file", agent.state / "token")
        # a package whose envelope did not verify is not kept in the device's history (issue 23, item 6: only
        # verified ids get a final record), so status never shows it as '? vNone'; the event log has it (below)
        assert "? vNone" not in r.stdout, r.stdout
    finally:
        agent.stop()
    log = _log(agent)
    assert " installed  adapter alpha v2: installed in " in log, log
    assert log.count("adapter alpha v2: installed") == 1  # the second push found it installed: nothing sent
    assert " rejected   update " in log and "does not trust" in log
    assert " request    chat" in log or " request    generate" in log
    assert " rollback   alpha v2 -> v1 (requested" in log


def test_log_json_writes_one_object_per_line(built, tmp_path):
    agent = AgentProcess(built["bundle"], built["public_key"], tmp_path / "state", "--log-json")
    try:
        r = run_cli("push", built["package"], "--to", agent.url, "--token-file", agent.state / "token")
        assert r.returncode == 0, r.stderr
        agent.chat("alpha", "hello")
    finally:
        agent.stop()
    events = [json.loads(ln) for ln in _log(agent).splitlines() if ln.startswith("{")]
    kinds = {e["event"]: e for e in events}
    assert kinds["installed"]["name"] == "alpha" and kinds["installed"]["version"] == 2
    assert kinds["request"]["adapters"] == ["alpha v2"] and kinds["request"]["status"] == "ok"
