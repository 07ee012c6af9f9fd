"""The dashboard's server without a browser (tests/test_web_dashboard.py drives it in Chromium): it reads
the rollout database read-only and refuses a wrong one at start, its data routes sit behind the device
API's guards, anything but GET is refused, and the progress lines are the benchmark plot's."""

from __future__ import annotations

import hashlib
import http.client
import json
import sqlite3
import threading

import pytest
from agent_support import run_cli

from edgepeft.errors import RolloutError, UsageError
from edgepeft.fleet.dashboard import DashboardServer, progress
from edgepeft.fleet.state import FAILED, IN_PROGRESS, SUCCEEDED, RolloutDB

TOKEN = "dashboard-token-0123456789abcdef"


@pytest.fixture
def served(tmp_path):
    db = RolloutDB(tmp_path / "r.sqlite")
    rid = db.create("plan<b>", {}, [("dev-<i>", "mqtt"), ("dev-2", "http")], 60.0)
    a, b = db.executions(rid).values()
    a.status, b.status, b.reason, b.attempts = IN_PROGRESS, FAILED, "<script>alert(1)</script>", 2
    db.save(rid, [a, b], [("dev-<i>", IN_PROGRESS, "notified"), ("dev-2", IN_PROGRESS, "notified"),
                          ("dev-2", FAILED, "no")])
    db.close()
    before = hashlib.sha256((tmp_path / "r.sqlite").read_bytes()).hexdigest()
    server = DashboardServer(tmp_path / "r.sqlite", "127.0.0.1", 0, token=TOKEN)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server, rid
    server.shutdown()
    server.server_close()
    assert hashlib.sha256((tmp_path / "r.sqlite").read_bytes()).hexdigest() == before  # nothing was written


def _req(server, method, path, token=TOKEN, headers=None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request(method, path, headers={**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body, r


def test_the_data_routes_answer_with_the_token_and_refuse_without(served):
    server, rid = served
    status, body, r = _req(server, "GET", "/api/rollouts")
    assert status == 200 and r.getheader("X-Content-Type-Options") == "nosniff"  # JSON is never sniffed as a page
    (item,) = json.loads(body)["rollouts"]
    assert item["id"] == rid and item["counts"] == {IN_PROGRESS: 1, FAILED: 1}
    status, body, _ = _req(server, "GET", f"/api/rollouts/{rid}")
    detail = json.loads(body)
    assert [d["device"] for d in detail["devices"]] == ["dev-<i>", "dev-2"]  # the inventory's order, as stored
    assert detail["devices"][1]["reason"] == "<script>alert(1)</script>" and detail["devices"][1]["attempts"] == 2
    assert detail["progress"]["lines"]["notified"][-1][1] == 2 and detail["progress"]["lines"]["failed"][-1][1] == 1
    assert _req(server, "GET", "/api/rollouts/nope")[0] == 404
    assert _req(server, "GET", "/api/rollouts", token=None)[0] == 401
    assert _req(server, "GET", "/api/rollouts", token="x" * 20)[0] == 401
    assert _req(server, "GET", "/api/rollouts", headers={"Host": "attacker.example"})[0] == 403
    assert _req(server, "GET", "/api/rollouts", headers={"Origin": "http://evil.example"})[0] == 403
    for method in ("POST", "PUT", "DELETE"):
        status, body, r = _req(server, method, "/api/rollouts")
        assert status == 405 and "read-only" in json.loads(body)["error"]["message"]


def test_the_page_loads_without_the_token_and_forbids_inline_code(served):
    server, _ = served
    status, body, r = _req(server, "GET", "/", token=None)
    assert status == 200 and b"dashboard.js" in body
    assert "script-src 'self'" in r.getheader("Content-Security-Policy") and r.getheader("X-Frame-Options") == "DENY"
    status, body, r = _req(server, "GET", "/static/dashboard.js", token=None,
                           headers={"Origin": f"http://127.0.0.1:{server.server_address[1]}"})  # a module script
    assert status == 200 and r.getheader("Content-Type").startswith("text/javascript")
    assert b"innerHTML" not in body  # data is set as text
    assert _req(server, "GET", "/static/../state.py", token=None)[0] == 404
    assert server.url.endswith(f"#token={TOKEN}")


def test_a_missing_or_foreign_database_is_refused_and_never_created(tmp_path):
    with pytest.raises(RolloutError, match="no rollout database"):
        DashboardServer(tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()
    with sqlite3.connect(tmp_path / "other.sqlite") as c:
        c.execute("CREATE TABLE t (x)")
    with pytest.raises(RolloutError, match="is not a rollout database"):
        DashboardServer(tmp_path / "other.sqlite")
    RolloutDB(tmp_path / "r.sqlite").close()
    with pytest.raises(UsageError, match="reachable from other machines"):
        DashboardServer(tmp_path / "r.sqlite", "0.0.0.0", 0)


def test_progress_counts_devices_as_the_benchmark_plot_does():
    events = [(10.0, IN_PROGRESS), (10.5, IN_PROGRESS), (11.0, SUCCEEDED), (12.0, "REJECTED"), (12.5, "QUEUED")]
    p = progress(events)
    assert p["start"] == 10.0
    assert p["lines"] == {"notified": [[0.0, 1], [0.5, 2]], "succeeded": [[1.0, 1]], "failed": [[2.0, 1]]}
    many = progress([(float(i), IN_PROGRESS) for i in range(1001)], max_points=100)["lines"]["notified"]
    assert len(many) <= 102 and many[-1] == [1000.0, 1001]


def test_the_cli_verb_refuses_a_missing_database_with_a_hint(tmp_path):
    r = run_cli("rollout", "serve", "--db", tmp_path / "missing.sqlite", "--listen", "127.0.0.1:0", timeout=60)
    assert r.returncode != 0 and "no rollout database" in r.stderr and "hint:" in r.stderr
    assert not (tmp_path / "missing.sqlite").exists()
