"""`edgepeft rollout serve` in a real browser (Debian's Chromium through Playwright) over a real rollout:
a controller process drives simulated devices through a real mosquitto broker while the dashboard reads
the same SQLite database read-only. The page must show the running rollout's devices, then end with the
statuses the controller reports; the data routes need the token and nothing can be written.

Two of the devices answer only after the page has shown the rollout running (their simulator is stopped
with SIGSTOP until then), so "running" is seen for certain, without a timed assertion.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from browser_support import ROOT, browser_page, require_browser, screenshot, wait_until

CHROMIUM = require_browser()
from fleet_support import Mosquitto, find_mosquitto  # noqa: E402
from test_runtime_support import cached_bundle, require_fixtures  # noqa: E402

require_fixtures()
if find_mosquitto() is None:
    pytest.skip("MOSQUITTO IS NOT INSTALLED: `make test` installs it; the dashboard test drives a real MQTT rollout",
                allow_module_level=True)

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SIM_ENROLLS = "--enroll" in subprocess.run([sys.executable, "-m", "edgepeft.fleet.simulator", "--help"], cwd=ROOT,
                                           env=ENV, capture_output=True, text=True, timeout=60).stdout


def _simulator(broker, prefix, count, fail_rate, enroll):
    """A simulator process for `count` devices, and their inventory entries (with each device's own public key
    where the simulator enrolls its devices: their reports are signed and the controller checks them)."""
    extra = ["--enroll", str(enroll)] if SIM_ENROLLS else []
    p = subprocess.Popen([sys.executable, "-m", "edgepeft.fleet.simulator", "--broker", broker.url, "--prefix", prefix,
                          "--count", str(count), "--fail-rate", str(fail_rate), *extra], stdout=subprocess.PIPE,
                         cwd=ROOT, env=ENV)
    assert p.stdout.readline().strip() == b"ready"
    if SIM_ENROLLS:
        return p, enroll.read_text()
    return p, "".join(f'[[device]]\nid = "{prefix}{i}"\naddress = "mqtt"\n\n' for i in range(count))


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        proc.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM once it runs again
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout:
        proc.stdout.close()


def _get(url, token=None, method="GET"):
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_the_dashboard_follows_a_real_rollout_in_chromium(tmp_path, tmp_path_factory):
    built = cached_bundle("decoder", tmp_path_factory)
    broker = Mosquitto(tmp_path / "broker")
    procs = []
    try:
        ok, ok_devices = _simulator(broker, "ok-", 6, 0.0, tmp_path / "enroll-ok.toml")
        late, late_devices = _simulator(broker, "late-", 2, 1.0, tmp_path / "enroll-late.toml")
        procs += [ok, late]
        late.send_signal(signal.SIGSTOP)  # it answers nothing until the page has shown the rollout running
        inv = f'[mqtt]\nurl = "{broker.url}"\n[repository]\nurl = "http://127.0.0.1:9/"\n\n' + ok_devices + late_devices
        (tmp_path / "fleet.toml").write_text(inv)
        (tmp_path / "plan.toml").write_text(f'''name = "web"
inventory = "fleet.toml"
packages = ["{built['package']}"]
key = "{built['private_key']}"
[rollout]
canary = 1
max_concurrency = 8
[rollout.exponential_rate]
base_rate_per_minute = 600
increment_factor = 2
[rollout.exponential_rate.rate_increase_criteria]
number_of_notified_things = 2
[timeouts]
in_progress_timeout_minutes = 5
''')
        db = tmp_path / "rollouts.sqlite"
        report = open(tmp_path / "report.json", "wb")
        controller = subprocess.Popen([sys.executable, "-m", "edgepeft", "rollout", "start", "plan.toml", "--db", str(db),
                                       "--json"], stdout=report, stderr=open(tmp_path / "controller.log", "wb"),
                                      cwd=tmp_path, env=ENV)
        procs.append(controller)
        (tmp_path / "token").write_text("dashboard-token-0123456789abcdef\n")
        serve = None
        for _ in range(600):  # the dashboard refuses a database the controller has not created yet
            serve = subprocess.Popen([sys.executable, "-m", "edgepeft", "rollout", "serve", "--db", str(db), "--listen",
                                      "127.0.0.1:0", "--token-file", str(tmp_path / "token")],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
            line = serve.stdout.readline().decode()
            if line.startswith("dashboard of "):
                break
            _stop(serve)
            assert controller.poll() is None, (tmp_path / "controller.log").read_text()
        procs.append(serve)
        base = line.rsplit(": ", 1)[1].strip()
        assert base.startswith("http://127.0.0.1:") and base.endswith("/"), base  # a file's token is not printed
        url = base + "#token=dashboard-token-0123456789abcdef"
        # the guards: no token, a wrong token, a write, a foreign Host
        assert _get(base + "api/rollouts")[0] == 401
        assert _get(base + "api/rollouts", "wrong-token-wrong-token")[0] == 401
        assert _get(base + "api/rollouts", "dashboard-token-0123456789abcdef", method="POST")[0] == 405
        req = urllib.request.Request(base + "api/rollouts", headers={"Host": "evil.example",
                                                                      "Authorization": "Bearer x"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 403

        with browser_page(CHROMIUM) as page:
            page.goto(base + "#token=%E0%A4%A")  # a malformed escape: the page says what to open, no token kept
            wait_until(page, "!document.querySelector('#error').hidden")
            assert "no token" in page.locator("#error").inner_text() and "#token" not in page.url
            page.goto("about:blank")  # (a fragment change alone does not load the page again)
            page.goto(url)
            # running: the late devices have no simulator yet, so the rollout cannot end
            wait_until(page, "document.body.dataset.running === 'true' && "
                             "document.querySelectorAll('#devices tbody tr').length === 8")
            assert page.locator("#detail-status").inner_text() == "IN_PROGRESS"
            assert "#token" not in page.url  # the token left the address bar
            screenshot(page, tmp_path / "out" / "dashboard-running.png")
            late.send_signal(signal.SIGCONT)  # now they answer: FAILED, "simulated failure"
            wait_until(page, "document.body.dataset.running === 'false'", 120)
            assert controller.wait(120) == 6  # not every device succeeded
            wait_until(page, "document.querySelector('#detail-status').innerText === 'COMPLETED'")
            rows = page.locator("#devices tbody tr")
            shown = {rows.nth(i).get_attribute("data-device"): rows.nth(i).get_attribute("data-status")
                     for i in range(rows.count())}
            got = {d["device"]: d["status"] for d in json.loads((tmp_path / "report.json").read_bytes())["devices"]}
            assert shown == got == {**{f"ok-{i}": "SUCCEEDED" for i in range(6)}, "late-0": "FAILED", "late-1": "FAILED"}
            assert page.locator("#devices tbody tr[data-device='late-1'] td").nth(5).inner_text() == "simulated failure"
            assert page.locator("#chart path[data-line='succeeded']").count() == 1
            assert "succeeded 6" in page.locator("#chart-legend").inner_text()
            assert "failed 2" in page.locator("#chart-legend").inner_text()
            png = screenshot(page, tmp_path / "out" / "dashboard.png", "dashboard.png")
        assert png.stat().st_size > 10_000
    finally:
        for p in reversed(procs):
            _stop(p)
        broker.stop()
