"""Adapter management without Python: `edgepeft adapters list|install|rollback|unload|load` against a
running agent (real process, its token) and against a state folder; `edgepeft verify`; the state
folder's lock; the bundle's own health checks on a device's first open."""

from __future__ import annotations

import json
import shutil
import urllib.error

import pytest
from agent_support import AgentProcess, run_cli
from test_runtime_support import require_fixtures
from update_support import version_of

require_fixtures()  # built here (server side) or prebuilt for a device run

from edgepeft.errors import BundleError, EngineError, StoreError  # noqa: E402
from edgepeft.runtime import Engine  # noqa: E402
from edgepeft.update.device import Device  # noqa: E402

Q = "héllo ☃"


def _json(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_adapters_against_a_running_agent(built, tmp_path):
    agent = AgentProcess(built["bundle"], built["public_key"], tmp_path / "state")
    dev = ["--device", agent.url, "--token-file", str(agent.state / "token")]
    try:
        listed = _json(run_cli("adapters", "list", *dev, "--json"))
        assert {a["name"]: a["version"] for a in listed["adapters"]} == {"alpha": 1, "beta": 1}
        r = run_cli("adapters", "install", built["package"], *dev)
        assert r.returncode == 0 and "alpha v2: healthy" in r.stdout, r.stdout + r.stderr
        assert agent.chat("alpha", Q)["adapter_version"] == 2
        table = run_cli("adapters", "list", *dev)
        assert table.returncode == 0 and any(ln.split()[:3] == ["alpha", "v2", "store"]
                                             for ln in table.stdout.splitlines()), table.stdout
        # unload: the model id is gone, requests naming it are 404, and it stays unloaded after a restart
        assert "beta: unloaded" in run_cli("adapters", "unload", "beta", *dev).stdout
        with pytest.raises(Exception) as gone:
            agent.chat("beta", Q)
        assert getattr(gone.value, "code", None) == 404
        r = run_cli("adapters", "unload", "nope", *dev)
        assert r.returncode != 0 and "unknown adapter" in r.stderr
        agent.stop()
        agent = AgentProcess(built["bundle"], built["public_key"], tmp_path / "state")
        dev = ["--device", agent.url, "--token-file", str(agent.state / "token")]
        listed = _json(run_cli("adapters", "list", *dev, "--json"))
        assert listed["unloaded"] == ["beta"] and "beta" not in {a["name"] for a in listed["adapters"]}
        assert "beta: serving" in run_cli("adapters", "load", "beta", *dev).stdout
        assert agent.chat("beta", Q)["adapter_version"] == 1
        r = run_cli("adapters", "rollback", "alpha", *dev)
        assert r.returncode == 0 and "alpha: v2 -> v1" in r.stdout, r.stdout + r.stderr
        assert agent.chat("alpha", Q)["adapter_version"] == 1
        r = run_cli("adapters", "rollback", "alpha", *dev)
        assert r.returncode != 0 and "no installed update to roll back" in r.stderr
        r = run_cli("adapters", "list", "--device", agent.url, "--token", "wrong-token-wrong-token")
        assert r.returncode != 0 and "401" in r.stderr
        # while the agent runs, its state folder is its own
        r = run_cli("adapters", "list", "--state", agent.state, "--trusted-key", built["public_key"])
        assert r.returncode != 0 and "in use by another process" in r.stderr
    finally:
        agent.stop()


def test_adapters_against_a_state_folder(built, tmp_path):
    state = tmp_path / "state"
    pub = built["public_key"]
    r = run_cli("adapters", "list", "--state", state, "--trusted-key", pub)
    assert r.returncode == 2 and "--bundle" in r.stderr  # a new state folder does not know its bundle yet
    local = ["--state", str(state), "--bundle", str(built["bundle"]), "--trusted-key", str(pub)]
    r = run_cli("adapters", "install", built["package"], *local, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "healthy", r.stdout + r.stderr
    five = version_of(built, tmp_path / "alpha-5.epu", 5)
    r = run_cli("adapters", "install", five, "--state", state, "--trusted-key", pub)  # the bundle is remembered
    assert r.returncode == 0 and "alpha v5: healthy" in r.stdout
    r = run_cli("adapters", "install", built["package"], "--state", state, "--trusted-key", pub)
    assert r.returncode == 5 and "rejected" in r.stdout and "older than v5" in r.stdout  # versions only go up
    listed = _json(run_cli("adapters", "list", "--state", state, "--trusted-key", pub, "--json"))
    alpha = next(a for a in listed["adapters"] if a["name"] == "alpha")
    assert (alpha["version"], alpha["previous"], alpha["floor"]) == (5, 2, 5)
    r = run_cli("adapters", "rollback", "alpha", "--state", state, "--trusted-key", pub)
    assert r.returncode == 0 and "alpha: v5 -> v2" in r.stdout
    assert "beta: unloaded" in run_cli("adapters", "unload", "beta", "--state", state, "--trusted-key", pub).stdout
    # what the agent then serves is what the state folder says
    agent = AgentProcess(built["bundle"], pub, state)
    try:
        assert agent.chat("alpha", Q)["adapter_version"] == 2
        with pytest.raises(urllib.error.HTTPError) as refused:  # an unloaded adapter is an unknown model
            agent.chat("beta", Q)
        assert refused.value.code in (400, 404)
    finally:
        agent.stop()
    r = run_cli("adapters", "load", "alpha", "--state", state, "--trusted-key", pub)
    assert r.returncode != 0 and "was not unloaded" in r.stderr
    r = run_cli("adapters", "list")
    assert r.returncode == 2 and "--device URL" in r.stderr


def test_verify_a_bundle_its_archive_and_an_update(built, tmp_path):
    pub = built["public_key"]
    for path, kind in [(built["bundle"], "bundle directory"), (built["bundle"].with_name("bundle.epb"), "archive"),
                       (built["package"], "update package")]:
        out = _json(run_cli("verify", path, "--trusted-key", pub, "--json"))
        assert out["verified"] is True and out["kind"] == kind, out
    copy = tmp_path / "copy"
    shutil.copytree(built["bundle"], copy)
    with open(copy / "adapters" / "alpha-1.onnx_adapter", "r+b") as fh:
        fh.seek(100)
        b = fh.read(1)
        fh.seek(100)
        fh.write(bytes([b[0] ^ 1]))
    r = run_cli("verify", copy, "--trusted-key", pub)
    assert r.returncode == 1 and "alpha-1.onnx_adapter does not match its SHA-256" in r.stderr
    r = run_cli("verify", built["bundle"])
    assert r.returncode == 2 and "no trusted public key" in r.stderr


def test_links_inside_a_bundle_are_refused_even_as_folders(built, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built["bundle"], copy)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(copy / "adapters", elsewhere)
    (copy / "adapters").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(BundleError, match="links are not allowed"):
        Engine(copy, [built["public_key"]])
    shutil.rmtree(copy / "adapters") if not (copy / "adapters").is_symlink() else (copy / "adapters").unlink()
    shutil.move(elsewhere, copy / "adapters")
    (copy / "tokenizer.json").rename(tmp_path / "tok.json")
    (copy / "tokenizer.json").symlink_to(tmp_path / "tok.json")
    with pytest.raises(BundleError, match="links are not allowed"):
        Engine(copy, [built["public_key"]])


def test_engine_concurrency_follows_the_bundles_target(built, tmp_path):
    from test_runtime_support import resign_bundle

    target = built["manifest"]["target"]
    two = resign_bundle(built, tmp_path / "two", target=target | {"budgets": target["budgets"] | {"max_concurrent": 2}})
    with Engine(two, [built["public_key"]]) as eng:
        assert eng.max_concurrent == eng.stats()["max_concurrent"] == 2  # what the fit check counted
    with Engine(two, [built["public_key"]], max_concurrent=3) as eng:
        assert eng.max_concurrent == 3
    with pytest.raises(EngineError, match="max_concurrent"):
        Engine(two, [built["public_key"]], max_concurrent=0)


def test_engine_close_and_context_manager(built):
    with Engine(built["bundle"], [built["public_key"]]) as eng:
        stream = eng.generate(Q, max_new_tokens=20, stream=True)
        next(stream)
        assert eng.stats()["running"] == 1
        with pytest.raises(EngineError, match="still run"):
            eng.close(timeout=0.2)  # a running stream is not cut from under its reader
        stream.close()
        stats = eng.stats()
        assert {k: stats[k] for k in ("running", "max_concurrent", "closed")} == {"running": 0, "max_concurrent": 4,
                                                                             "closed": True}
        assert stats["batch"]["active"] == 0  # the stream's row is free
    assert eng.closed and eng.session is None and eng.adapters() == []
    with pytest.raises(EngineError, match="closed"):
        eng.generate(Q)
    eng.close()  # idempotent


def test_a_bundles_own_health_checks_run_on_the_first_open(built, tmp_path):
    from test_runtime_support import resign_bundle

    ok_answer = Engine(built["bundle"], [built["public_key"]]).generate(
        messages=[{"role": "user", "content": "hello"}], max_new_tokens=4).text
    good = resign_bundle(built, tmp_path / "good", health_checks=[
        {"input": "hello", "expect": {"contains": ok_answer[:3]}, "max_new_tokens": 4}])
    bad = resign_bundle(built, tmp_path / "bad", health_checks=[
        {"input": "hello", "expect": {"equals": "an answer no tiny model gives"}, "max_new_tokens": 4}])
    Engine(good, [built["public_key"]])
    with pytest.raises(BundleError, match="own health checks fail on this device") as refused:
        Engine(bad, [built["public_key"]])
    assert "--skip-health-checks" in refused.value.hint
    assert Engine(bad, [built["public_key"]], health_checks=False).task == "causal-lm"
    r = run_cli("run", bad, "--trusted-key", built["public_key"], "--prompt", "hi", "--max-new-tokens", "2")
    assert r.returncode == 1 and "health checks fail" in r.stderr
    r = run_cli("run", bad, "--trusted-key", built["public_key"], "--prompt", "hi", "--max-new-tokens", "2",
                "--skip-health-checks")
    assert r.returncode == 0
    # a device runs them on its first open of a bundle and remembers that they passed
    dev = Device(good, [built["public_key"]], tmp_path / "state")
    dev.close()
    checked = json.loads((tmp_path / "state" / "checked.json").read_text())
    assert len(checked) == 1
    with pytest.raises(BundleError, match="health checks fail"):
        Device(bad, [built["public_key"]], tmp_path / "state2")
    with pytest.raises(StoreError, match="in use by another process"):
        first = Device(good, [built["public_key"]], tmp_path / "state3")
        try:
            Device(good, [built["public_key"]], tmp_path / "state3")
        finally:
            first.close()


def test_an_installed_version_that_no_longer_verifies_is_a_warning_everywhere(built, tmp_path):
    """A stored version damaged on disk is not served (the previous one is); users see why: `run`
    prints it, the agent's /v1/models and `adapters list` carry it in their warnings."""
    import urllib.request

    state, pub = tmp_path / "state", built["public_key"]
    dev = Device(built["bundle"], [pub], state)
    assert dev.install_file(built["package"]).status == "healthy"
    dev.close()
    stored = state / "adapters" / "alpha" / "v-2.epu"
    data = bytearray(stored.read_bytes())
    data[-10] ^= 1
    stored.write_bytes(bytes(data))
    r = run_cli("run", built["bundle"], "--trusted-key", pub, "--state", state, "--raw", "--prompt", "the tin",
                "--max-new-tokens", "2", "--adapter", "alpha")
    assert r.returncode == 0 and "warning: alpha v2 not served" in r.stderr, r.stderr
    agent = AgentProcess(built["bundle"], pub, state)
    try:
        req = urllib.request.Request(agent.url + "/v1/models", headers={"Authorization": f"Bearer {agent.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            models = json.load(resp)
        assert any("alpha v2 not served" in w for w in models["warnings"]), models
        assert agent.chat("alpha", Q)["adapter_version"] == 1
        listed = _json(run_cli("adapters", "list", "--device", agent.url, "--token", agent.token, "--json"))
        assert any("alpha v2 not served" in w for w in listed["warnings"])
    finally:
        agent.stop()


def test_the_agent_listens_beyond_the_device_only_when_told(built, tmp_path):
    r = run_cli("agent", built["bundle"], "--trusted-key", built["public_key"], "--state", tmp_path / "s",
                "--listen", "0.0.0.0:0")
    assert r.returncode == 2 and "reachable from other machines" in r.stderr and "--expose" in r.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was written
