"""Section 9: fleet rollout throughput. The controller (`edgepeft rollout start`, in a process of its own)
moves 10,000 simulated devices through a canary and waves over a real mosquitto broker on 127.0.0.1.

The simulated devices (``edgepeft.fleet.simulator``, two processes, 5,000 devices each) answer on the same
topics as agents (IN_PROGRESS, then SUCCEEDED, signed with each device's own key, enrolled in the inventory)
without installing anything, so this measures the controller (verifying every report) and the broker, not
devices. Devices/s, broker messages/s ($SYS counters), the controller's peak memory,
and progress over time (plot) come from one run; AWS IoT Jobs caps a rollout at 1,000 devices per minute.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from .context import Context
from .harness import Section, Skip

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 2


def _sys_counters(url: str, out: dict, stop: threading.Event) -> None:
    """Follow mosquitto's $SYS message counters (sys_interval 1) until ``stop``."""
    from edgepeft.transport.mqtt import mqtt_client

    c = mqtt_client(url, "edgepeft-bench-sys")

    def on_message(client, userdata, msg):
        try:
            out[msg.topic] = int(msg.payload)
        except ValueError:
            pass

    c.on_connect = lambda cl, *a: cl.subscribe([("$SYS/broker/messages/received", 0),
                                                ("$SYS/broker/messages/sent", 0)])
    c.on_message = on_message
    ud = c.user_data_get()
    c.connect(ud["host"], ud["port"])
    c.loop_start()
    stop.wait()
    c.disconnect()
    c.loop_stop()


def run(ctx: Context) -> Section:
    sec = Section("fleet", "9. Fleet rollout: controller throughput over MQTT (simulated devices)")
    n = 300 if ctx.smoke else 10_000
    try:
        _measure(ctx, sec, n)
    except Skip as exc:
        ctx.skip("fleet rollout", str(exc))
    return sec


def _measure(ctx: Context, sec: Section, n: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from fleet_support import Mosquitto, find_mosquitto
    finally:
        sys.path.pop(0)
    if find_mosquitto() is None:
        raise Skip("mosquitto is not installed (make test / make demo install it with apt)")
    from .fixtures import lora_adapter
    from .sec_transport import _packages
    from .systems import bundle_qv

    qv = bundle_qv(ctx)
    peft = lora_adapter(ctx.models.decoder_dir, ctx.work / "adapters", seed=0, targets=["q_proj", "v_proj"])
    package = _packages(ctx, qv, "qv", peft, "int8", 1, "fleet")[0]
    from .sys_edgepeft import keypair

    key = keypair(ctx.work)[0]
    work = ctx.work / "fleet"
    work.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(work / "broker", extra="sys_interval 1\n")  # $SYS counters every second
    sims = []
    stop = threading.Event()
    counters: dict = {}
    try:
        for k in range(SHARDS):
            p = subprocess.Popen([sys.executable, "-m", "edgepeft.fleet.simulator", "--broker", broker.url, "--count",
                                  str(n), "--shard", f"{k}/{SHARDS}", "--enroll", str(work / f"enroll-{k}.toml")],
                                 stdout=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            sims.append(p)
        for p in sims:
            if p.stdout.readline().strip() != b"ready":
                raise Skip("a device simulator did not start")
        inv = [f'[mqtt]\nurl = "{broker.url}"\n[repository]\nurl = "http://127.0.0.1:9/"\n']
        # each simulated device's own public key, enrolled as a real device's would be; in id order
        inv += sorted(e.strip() + "\n" for k in range(SHARDS)
                      for e in (work / f"enroll-{k}.toml").read_text().split("\n\n") if e.strip())
        (work / "fleet.toml").write_text("\n".join(inv))
        (work / "plan.toml").write_text(f'''name = "bench"
inventory = "fleet.toml"
packages = ["{package}"]
key = "{key}"
[rollout]
canary = 10
max_concurrency = {n}
maximum_per_minute = 1000000
[rollout.exponential_rate]
base_rate_per_minute = 30000
increment_factor = 2
[rollout.exponential_rate.rate_increase_criteria]
number_of_notified_things = {max(n // 5, 10)}
[timeouts]
in_progress_timeout_minutes = 5
''')
        db = work / "rollouts.sqlite"
        db.unlink(missing_ok=True)
        watcher = threading.Thread(target=_sys_counters, args=(broker.url, counters, stop), daemon=True)
        watcher.start()
        time.sleep(1.5)
        before = dict(counters)
        import psutil

        t0 = time.perf_counter()
        out_file = open(work / "report.json", "wb")  # a file, not a pipe: the report is large
        proc = subprocess.Popen([sys.executable, "-m", "edgepeft", "rollout", "start", str(work / "plan.toml"),
                                 "--db", str(db), "--json"], stdout=out_file, stderr=subprocess.DEVNULL,
                                cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)})
        peak = 0
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        out_file.close()
        report = json.loads((work / "report.json").read_bytes() or b"{}")
        time.sleep(1.5)
        after = dict(counters)
    finally:
        stop.set()
        for p in sims:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
            p.stdout.close()
        broker.stop()
    if report.get("status") != "SUCCEEDED":
        raise Skip(f"the rollout did not succeed: {report.get('status')} {report.get('counts')}")
    with sqlite3.connect(db) as c:
        events = c.execute("SELECT at, status FROM events ORDER BY at").fetchall()
    start = events[0][0] if events else 0.0
    run_s = (events[-1][0] - start) if events else wall
    notified, done, lines_n, lines_d = 0, 0, [], []
    for at, status in events:
        if status == "IN_PROGRESS":
            notified += 1
            lines_n.append([round(at - start, 3), notified])
        elif status == "SUCCEEDED":
            done += 1
            lines_d.append([round(at - start, 3), done])
    step = max(1, len(lines_n) // 400)
    sec.series.append({"id": "progress", "title": f"rollout of {n} simulated devices over MQTT", "x": "seconds",
                       "y": "devices", "lines": {"notified": lines_n[::step] + lines_n[-1:],
                                                 "succeeded (health-gated)": lines_d[::step] + lines_d[-1:]}})
    msgs = None
    if "$SYS/broker/messages/received" in after and "$SYS/broker/messages/received" in before:
        msgs = sum(after.get(k, 0) - before.get(k, 0) for k in ("$SYS/broker/messages/received",
                                                                 "$SYS/broker/messages/sent"))
    g = sec.group("rollout_s", f"time to roll {n} devices through a canary and waves", "lower")
    g.add("edgepeft rollout controller", "s", [run_s],
          note=f"first notification to last result; the process lived {wall:.1f} s (start-up and plan checks included); "
               f"{report.get('waves')} waves")
    sec.group("devices_per_s", "devices completed per second", "higher").add(
        "edgepeft rollout controller", "devices/s", [n / run_s])
    if msgs is not None:
        sec.group("broker_msgs_per_s", "broker messages per second (received + sent, $SYS)", "higher").add(
            "mosquitto 2.0 on 127.0.0.1", "msgs/s", [msgs / wall])
    sec.group("controller_rss", "controller peak resident memory", "lower").add(
        "edgepeft rollout controller", "bytes", [peak])
    sec.notes.append(f"{SHARDS} simulator processes answer on the agents' topics without installing; the controller, "
                     "the simulators and the broker share the same 2 cores. AWS IoT Jobs caps a rollout at "
                     "1,000 devices per minute.")


def goal_fleet(sec: Section) -> dict:
    goal = {"name": "fleet rollout throughput", "target": "10,000 devices through canary and waves in <= 60 s"}
    g = sec.find("rollout_s")
    f = g.get("edgepeft rollout controller") if g else None
    if f is None:
        return goal | {"met": None, "measured": "not measured"}
    d = sec.find("devices_per_s").figures[0].median
    return goal | {"met": f.median <= 60.0, "measured": f"{f.median:.1f} s ({d:.0f} devices/s)"}
