"""Fleet rollouts with real parts: 20 `edgepeft agent` processes on 127.0.0.1 (HTTP, MQTT through a real
mosquitto, two behind simulated serial lines), a TUF repository behind `python -m http.server`, and the
controller (in process, and as `edgepeft rollout` processes killed and resumed).

Built to fail honestly: a device group whose int4 bundle fails the update's health check (FAILED), a device
on another base (REJECTED), an address where nothing listens and an agent killed mid-transfer (TIMED_OUT), a
slow serial device (SUCCEEDED, late). Each device's result is what its agent reported.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from agent_support import ROOT, AgentProcess, run_cli
from fleet_support import Mosquitto, find_mosquitto, free_port
from test_runtime_support import build_decoder_bundle, cached_bundle
from update_support import forge

pytestmark = pytest.mark.skipif(find_mosquitto() is None,
                                reason="MOSQUITTO IS NOT INSTALLED: `make test` installs it (apt-get install mosquitto); "
                                       "the fleet's MQTT control plane cannot be tested without a real broker")


def _answer(bundle, pub, package, prompt):
    from edgepeft.runtime import Engine

    eng = Engine(bundle, [pub])
    eng.load_adapter(package, name="probe")
    return eng.generate(messages=[{"role": "user", "content": prompt}], adapter="probe", max_new_tokens=8).text


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """The whole fleet, started once: 20 agents, a broker, a repository, serial lines."""
    from edgepeft.release.tuf_repo import publish
    from edgepeft.transport.linesim import NullModem

    built = cached_bundle("decoder", tmp_path_factory)
    key, pub = built["private_key"], built["public_key"]
    root = tmp_path_factory.mktemp("fleet")
    # same base, another graph; fp32 LoRA B slots, so the fp32 bundle's packages load into it too (an int4
    # graph's default int8 B slots take only packages exported for them, and refuse the others by name)
    int4 = build_decoder_bundle(root / "int4", key, quant="int4", lora_b="fp32")
    other = build_decoder_bundle(root / "other", key, base_seed=5)  # another base
    # a health check the fp32 graph passes and the int4 graph fails: v2's own fp32 answer, exactly
    prompt = next(p for p in ("hello", "the tin", "abc", "router", "wifi", "x y z", "tin tin", "help me")
                  if _answer(built["bundle"], pub, built["package"], p) !=
                  _answer(int4["bundle"], pub, built["package"], p))
    check = {"input": prompt, "expect": {"equals": _answer(built["bundle"], pub, built["package"], prompt)},
             "max_new_tokens": 8}

    pkgs = {}
    for v in (2, 3, 4):
        p = root / f"alpha-{v}.epu"
        p.write_bytes(forge(built["package"].read_bytes(), key,
                            mutate=lambda m, v=v: (m["adapter"].update(version=v), m.update(health_checks=[check]))))
        pkgs[v] = p
    publish(list(pkgs.values()), repo=root / "repo", key=key)
    web = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory",
                            str(root / "repo")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    repo_url = f"http://127.0.0.1:{web.stdout.readline().decode().split(' port ')[1].split()[0]}"
    broker = Mosquitto(root / "broker")
    lines = {"s-slow": NullModem(57600).start(), "s-killed": NullModem(57600).start()}
    agents, devices = {}, []

    def agent(dev_id, bundle, group, link="http", *extra):
        a = AgentProcess(bundle, pub, root / "devices" / dev_id, *extra, wait=False)
        agents[dev_id] = a
        devices.append((dev_id, group, link))

    agent("a0", built["bundle"], "a")
    for i in range(3):
        agent(f"c{i}", int4["bundle"], "c")
    for i in range(1, 6):
        agent(f"a{i}", built["bundle"], "a")
    for i in range(8):
        agent(f"b{i}", built["bundle"], "b", "mqtt", "--mqtt", broker.url, "--device-id", f"b{i}")
    agent("d0", other["bundle"], "d")
    for name, line in lines.items():
        agent(name, built["bundle"], "s", "serial", "--serial", line.b, "--baud", 57600)
    for a in agents.values():
        a.wait_ready()
    inv = [f'[mqtt]\nurl = "{broker.url}"\n\n[repository]\nurl = "{repo_url}"\n']
    for dev_id, group, link in devices:
        a = agents[dev_id]
        address = {"http": a.url, "mqtt": "mqtt", "serial": f"serial://{lines.get(dev_id, lines['s-slow']).a}?baud=57600"}
        inv.append(f'[[device]]\nid = "{dev_id}"\naddress = "{address[link]}"\ngroup = "{group}"\n'
                   + (f'token_file = "{a.state}/token"\n' if link == "http" else "")
                   + (f'public_key = "{a.state}/identity.pub"\n' if link == "mqtt" else ""))  # its own key
    inv.append(f'[[device]]\nid = "e0"\naddress = "http://127.0.0.1:{free_port()}"\ngroup = "e"\n'
               f'token_file = "{root}/no-token"\n')
    (root / "no-token").write_text("nothing-listens-here-token\n")
    (root / "fleet.toml").write_text("\n".join(inv))
    yield {"root": root, "agents": agents, "lines": lines, "packages": pkgs, "key": key, "built": built}
    for a in agents.values():
        a.stop() if a.proc.poll() is None else None
    for line in lines.values():
        line.close()
    broker.stop()
    web.terminate()
    web.wait(10)
    web.stdout.close()


def _plan(fleet, name, version, extra="", select='groups = ["a", "b", "c", "d", "e", "s"]'):
    p = fleet["root"] / f"{name}.toml"
    p.write_text(f'''name = "{name}"
inventory = "fleet.toml"
packages = ["alpha-{version}.epu"]
key = "{fleet['key']}"

[select]
{select}
{extra}''')
    return p


def _statuses(rep):
    return {d["device"]: d["status"] for d in rep["devices"]}


def test_a_rollout_reports_every_device_truthfully(fleet):
    from edgepeft.fleet.controller import start_rollout

    plan = _plan(fleet, "v2", 2, '''
[rollout]
canary = 1
max_concurrency = 30
[rollout.exponential_rate]
base_rate_per_minute = 240
increment_factor = 2
[rollout.exponential_rate.rate_increase_criteria]
number_of_notified_things = 4
[timeouts]
in_progress_timeout_minutes = 0.3
[[abort.criteria]]
failure_type = "ALL"
threshold_percentage = 60
min_number_of_executed_things = 10
''')
    killer = fleet["agents"]["s-killed"]

    def kill_mid_transfer():  # pull the plug on that device once a third of the package crossed its line
        line = fleet["lines"]["s-killed"]
        while line.carried[0] < fleet["packages"][2].stat().st_size // 3:
            time.sleep(0.05)
        killer.kill()
    threading.Thread(target=kill_mid_transfer, daemon=True).start()
    rollout = start_rollout(plan, fleet["root"] / "rollouts.sqlite", log=lambda m: None)
    rep = rollout.run(timeout=240)
    got = _statuses(rep)
    want = {**{f"a{i}": "SUCCEEDED" for i in range(6)}, **{f"b{i}": "SUCCEEDED" for i in range(8)},
            **{f"c{i}": "FAILED" for i in range(3)}, "d0": "REJECTED", "e0": "TIMED_OUT", "s-slow": "SUCCEEDED",
            "s-killed": "TIMED_OUT"}
    assert got == want, {k: (v, next(d["reason"] for d in rep["devices"] if d["device"] == k))
                         for k, v in got.items() if want.get(k) != v}
    reasons = {d["device"]: d["reason"] or "" for d in rep["devices"]}
    assert "health check failed" in reasons["c0"] and "built for base" in reasons["d0"]
    assert rep["status"] == "COMPLETED" and rep["waves"] >= 3  # the canary, then a rate that grew
    waves = {d["device"]: d["wave"] for d in rep["devices"]}
    assert waves["a0"] == 0 and max(waves.values()) >= 2
    # success means the device's own health check passed: each succeeded agent serves v2 now
    for dev in ("a3", "b5", "s-slow"):
        alpha = next(a for a in fleet["agents"][dev].device()["adapters"] if a["name"] == "alpha")
        assert alpha["version"] == 2, dev
    # the per-device log, and the CLI's view of the same state
    r = run_cli("rollout", "status", rollout.id, "--db", fleet["root"] / "rollouts.sqlite", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["counts"]["SUCCEEDED"] == 15
    r = run_cli("rollout", "status", rollout.id, "--device", "c1", "--db", fleet["root"] / "rollouts.sqlite")
    assert "IN_PROGRESS" in r.stdout and "FAILED" in r.stdout and "health check failed" in r.stdout


def test_the_abort_threshold_halts_the_rollout_and_rolls_back(fleet):
    from edgepeft.fleet.controller import start_rollout

    plan = _plan(fleet, "v3", 3, '''
[rollout]
canary = 1
max_concurrency = 2
[rollout.exponential_rate]
base_rate_per_minute = 120
[timeouts]
in_progress_timeout_minutes = 0.3
[[abort.criteria]]
failure_type = "FAILED"
threshold_percentage = 50
min_number_of_executed_things = 3
[abort]
rollback = true
''', select='groups = ["a", "c", "b"]')
    rep = start_rollout(plan, fleet["root"] / "rollouts.sqlite", log=lambda m: None).run(timeout=240)
    got = _statuses(rep)
    assert rep["status"] == "ABORTED" and "ended FAILED" in rep["reason"], json.dumps([(d["device"], d["status"], d["reason"], d["wave"]) for d in rep["devices"]])
    assert got["a0"] == "ROLLED_BACK" and got["c0"] == "FAILED" and got["c1"] == "FAILED"
    assert sum(s == "CANCELED" for s in got.values()) >= 10, got  # nothing new was started after the abort
    alpha = next(a for a in fleet["agents"]["a0"].device()["adapters"] if a["name"] == "alpha")
    assert alpha["version"] == 2  # back to the version it ran before this rollout
    for dev in ("b0", "a5"):  # never notified: still on v2
        assert next(a for a in fleet["agents"][dev].device()["adapters"] if a["name"] == "alpha")["version"] == 2


def test_a_killed_controller_resumes_without_installing_anything_twice(fleet):
    db = fleet["root"] / "kill.sqlite"
    plan = _plan(fleet, "v4", 4, '''
[rollout]
canary = 1
max_concurrency = 3
[rollout.exponential_rate]
base_rate_per_minute = 90
[timeouts]
in_progress_timeout_minutes = 0.5
''', select='groups = ["a", "b"]')
    env = {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "edgepeft", "rollout", "start", str(plan), "--db", str(db)],
                            cwd=fleet["root"], env={**__import__("os").environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and done < 4:
        time.sleep(0.2)
        try:
            with sqlite3.connect(db) as c:
                done = c.execute("SELECT COUNT(*) FROM executions WHERE status = 'SUCCEEDED'").fetchone()[0]
        except sqlite3.Error:
            pass
    proc.send_signal(signal.SIGKILL)  # mid-rollout: some devices done, some in progress, most queued
    proc.wait(10)
    with sqlite3.connect(db) as c:
        rid, = c.execute("SELECT id FROM rollouts").fetchone()
        before = dict(c.execute("SELECT device_id, status FROM executions").fetchall())
    assert 4 <= sum(s == "SUCCEEDED" for s in before.values()) < 14, before
    r = run_cli("rollout", "resume", rid, "--db", db, "--json", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["status"] == "SUCCEEDED" and set(_statuses(rep).values()) == {"SUCCEEDED"}
    pkg_id = __import__("hashlib").sha256(
        fleet["packages"][4].read_bytes()[:__import__("edgepeft.contracts.update", fromlist=["x"]).envelope_length(
            fleet["packages"][4].read_bytes())]).hexdigest()
    for dev, a in fleet["agents"].items():
        if dev[0] not in "ab":
            continue
        installs = [h for h in a.device()["recent"] if h.get("id") == pkg_id and h.get("status") == "healthy"]
        assert len(installs) == 1, (dev, installs)  # installed exactly once, whatever the controller did


def test_the_eval_gate_refuses_an_adapter_with_a_weak_slice(fleet, tmp_path):
    record = {"metrics": {"eval": {"accuracy": 0.91, "macro_f1": 0.9,
                                   "slices": {"app": {"accuracy": 0.95, "examples": 40},
                                              "sms": {"accuracy": 0.55, "examples": 12}}}}}
    (fleet["root"] / "record.json").write_text(json.dumps(record))
    plan = _plan(fleet, "gated", 2, '''
[eval_gate]
record = "record.json"
[[eval_gate.floor]]
metric = "accuracy"
min = 0.8
[[eval_gate.floor]]
metric = "accuracy"
slice = "*"
min = 0.7
''')
    r = run_cli("rollout", "start", plan, "--db", tmp_path / "gate.sqlite")
    assert r.returncode != 0
    assert "slice 'sms' = 0.550, under the floor 0.700" in r.stderr and "error:" in r.stderr
    assert not (tmp_path / "gate.sqlite").exists() or "gated" not in (tmp_path / "gate.sqlite").read_bytes().decode(
        "latin-1")
    # the package's own (signed) metrics are the default source: none here, so a demanding plan refuses too
    plan2 = _plan(fleet, "gated2", 2, "[eval_gate]\nrequire_record = true\n")
    r = run_cli("rollout", "start", plan2, "--db", tmp_path / "gate.sqlite")
    assert r.returncode != 0 and "no training record" in r.stderr
