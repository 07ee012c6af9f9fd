"""``edgepeft rollout serve``: a read-only web page over the rollout database (standard library only).

What it shows: every rollout with its status and abort reason, one rollout's devices (status, attempts,
wave, reason) and its progress over time (devices notified, succeeded and failed, from the ``events``
table: the same data as the benchmark's rollout plot). The page polls while a rollout runs.

Why it is safe to leave running beside a controller: the database is opened read-only for each request
(``file:...?mode=ro``), so the dashboard can never change a rollout; the data routes sit behind the device
API's guards (bearer token, ``Host`` check against DNS rebinding, foreign ``Origin`` refused), reused
from :mod:`edgepeft.runtime.http`, and it binds loopback unless told otherwise. The page itself (static
files, no data) loads without the token; it reads the token from the URL's ``#token=`` fragment (never
sent to a server) and sends it as ``Authorization: Bearer``. Everything it renders is set as text.

Routes: ``GET /`` (the page), ``GET /static/<file>``, ``GET /health``, and with the token
``GET /api/rollouts`` and ``GET /api/rollouts/<id>``.
"""

from __future__ import annotations

import re
import sqlite3
from importlib import resources
from pathlib import Path
from urllib.parse import quote, unquote

from ..errors import RolloutError
from ..runtime.http import ApiError, ApiHandler, EngineServer, is_loopback
from .state import EXECUTED, SUCCEEDED

STATIC = {"index.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
          "dashboard.css": "text/css; charset=utf-8"}
_ROLLOUT = re.compile(r"^/api/rollouts/([^/?#]{1,200})$")
FAILED_LIKE = tuple(s for s in EXECUTED if s != SUCCEEDED)  # what the chart counts as failed
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def open_readonly(path: str | Path) -> sqlite3.Connection:
    """A read-only connection to a rollout database. Raises :class:`RolloutError` when the file is
    missing or is not a rollout database (it is never created or written)."""
    p = Path(path).resolve()
    if not p.is_file():
        raise RolloutError(f"no rollout database at {p}", hint="pass --db with the file `edgepeft rollout start` wrote")
    try:
        conn = sqlite3.connect(f"file:{quote(str(p))}?mode=ro", uri=True, timeout=10, check_same_thread=False)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise RolloutError(f"cannot read the rollout database {p}: {exc}",
                           hint="pass --db with the file `edgepeft rollout start` wrote") from exc
    if not {"rollouts", "executions", "events"} <= tables:
        conn.close()
        raise RolloutError(f"{p} is not a rollout database (it has no rollouts, executions and events tables)",
                           hint="pass --db with the file `edgepeft rollout start` wrote")
    return conn


def list_rollouts(conn: sqlite3.Connection) -> list[dict]:
    """Every rollout, newest first, with its device counts per status."""
    rows = conn.execute("SELECT id, name, status, reason, created, updated FROM rollouts ORDER BY created DESC").fetchall()
    counts: dict[str, dict[str, int]] = {}
    for rid, status, n in conn.execute("SELECT rollout_id, status, COUNT(*) FROM executions GROUP BY rollout_id, status"):
        counts.setdefault(rid, {})[status] = n
    return [dict(zip(("id", "name", "status", "reason", "created", "updated"), r)) | {"counts": counts.get(r[0], {})}
            for r in rows]


def rollout_detail(conn: sqlite3.Connection, rid: str) -> dict | None:
    """One rollout: its row, its devices in inventory order, and its progress over time (seconds since
    the first event: devices notified, succeeded and failed). None when there is no such rollout."""
    row = conn.execute("SELECT id, name, status, reason, created, updated, rate, wave FROM rollouts WHERE id = ?",
                       (rid,)).fetchone()
    if row is None:
        return None
    out = dict(zip(("id", "name", "status", "reason", "created", "updated", "rate_per_minute", "waves"), row))
    out["devices"] = [dict(zip(("device", "link", "status", "attempts", "wave", "package", "started", "updated",
                                "reason"), r))
                      for r in conn.execute("SELECT device_id, link, status, attempts, wave, package, started, updated, "
                                            "reason FROM executions WHERE rollout_id = ? ORDER BY seq", (rid,))]
    counts: dict[str, int] = {}
    for d in out["devices"]:
        counts[d["status"]] = counts.get(d["status"], 0) + 1
    out["counts"] = counts
    out["progress"] = progress(conn.execute("SELECT at, status FROM events WHERE rollout_id = ? ORDER BY at",
                                            (rid,)).fetchall())
    return out


def progress(events: list[tuple[float, str]], max_points: int = 400) -> dict:
    """Cumulative lines [[seconds, devices], ...] from (time, status) events, as benchmarks/sec_fleet.py
    plots them: a device counts as notified at IN_PROGRESS, then as succeeded or failed."""
    start = events[0][0] if events else 0.0
    lines: dict[str, list] = {"notified": [], "succeeded": [], "failed": []}
    n = {"notified": 0, "succeeded": 0, "failed": 0}
    for at, status in events:
        key = "notified" if status == "IN_PROGRESS" else "succeeded" if status == SUCCEEDED else \
            "failed" if status in FAILED_LIKE else None
        if key:
            n[key] += 1
            lines[key].append([round(at - start, 3), n[key]])
    for k, pts in lines.items():
        step = max(1, len(pts) // max_points)
        lines[k] = pts[::step] + (pts[-1:] if pts and (len(pts) - 1) % step else [])
    return {"start": start, "lines": lines}


class DashboardHandler(ApiHandler):
    """The page and the read-only data routes, behind the device API's guards."""

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            return self.dispatch(lambda: self.send_json(200, {"status": "ok"}), token=False)
        if path in ("/", "/index.html"):
            return self.dispatch(self._static, "index.html", token=False)
        if path.startswith("/static/"):
            return self.dispatch(self._static, path[len("/static/"):], token=False)
        if path == "/api/rollouts":
            return self.dispatch(lambda: self.send_json(200, {"rollouts": self._query(list_rollouts)}))
        m = _ROLLOUT.match(path)
        if m is not None:
            return self.dispatch(self._rollout, unquote(m.group(1)))
        return self.dispatch(self._no_route, token=False)  # a 404 tells nothing (favicon.ico)

    def do_POST(self):
        return self.dispatch(self._read_only)

    do_PUT = do_DELETE = do_PATCH = do_POST

    def _read_only(self):
        raise ApiError(405, f"{self.command} is not allowed: the dashboard is read-only", "method_not_allowed",
                       "change rollouts with `edgepeft rollout abort|resume`", headers={"Allow": "GET"})

    def _no_route(self):
        raise ApiError(404, f"no route {self.command} {self.path}", "not_found",
                       "open / for the page; the data is under /api/rollouts")

    def _query(self, fn, *args):
        try:
            conn = open_readonly(self.server.db_path)
        except RolloutError as exc:
            raise ApiError(503, exc.message, "unavailable", exc.hint) from exc
        try:
            return fn(conn, *args)
        except sqlite3.Error as exc:
            raise ApiError(503, f"cannot read the rollout database: {exc}", "unavailable", "retry in a moment") from exc
        finally:
            conn.close()

    def _rollout(self, rid: str):
        detail = self._query(rollout_detail, rid)
        if detail is None:
            raise ApiError(404, f"no rollout {rid!r} in this database", "not_found", "list them at /api/rollouts")
        self.send_json(200, detail)

    def _static(self, name: str):
        ctype = STATIC.get(name)
        if ctype is None:
            raise ApiError(404, f"no file {name!r}", "not_found", "the page is at /")
        body = resources.files(__package__).joinpath("dashboard_static", name).read_bytes()
        self.send_body(200, body, ctype, {"Content-Security-Policy": CSP,
                                          "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"})


class DashboardServer(EngineServer):
    """The dashboard's HTTP server over ``db`` (read-only). ``token``, ``token_source``, ``expose`` and
    ``limits`` are :class:`~edgepeft.runtime.http.EngineServer`'s (None: a fresh random token).
    Raises :class:`RolloutError` for a missing or foreign database, ``UsageError`` for a refused
    address or token, ``OSError`` when the address cannot be bound."""

    def __init__(self, db: str | Path, host: str = "127.0.0.1", port: int = 0, **options):
        open_readonly(db).close()  # refuse a wrong --db at start, not on the first page load
        self.db_path = Path(db).resolve()
        super().__init__(None, host, port, handler=DashboardHandler, **options)
        # the page's own origin: browsers send Origin with module scripts and CORS-mode fetches
        bound, port = self.server_address[:2]
        names = {bound, "localhost", "127.0.0.1"} if is_loopback(bound) else {bound}
        self.allowed_origins = self.allowed_origins | {f"http://[{n}]:{port}" if ":" in n else f"http://{n}:{port}"
                                                        for n in names}

    @property
    def url(self) -> str:
        """The page's address with the token in its fragment (what to open in a browser)."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/" + (f"#token={quote(self.token)}" if self.token else "")

