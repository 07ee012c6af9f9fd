"""Rollout state in SQLite (standard library): written before each action, so a controller killed at any
point resumes where it was, without installing anything twice and without losing a device's result.

Tables: ``rollouts`` (one row per rollout: plan, status, rate, counters), ``executions`` (one row per
device: AWS IoT Jobs' execution status, attempts, wave, times, reason) and ``events`` (a log per device).
WAL mode, so ``edgepeft rollout status`` can read while a controller writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import RolloutError

# AWS IoT Jobs' execution statuses, plus ROLLED_BACK (a device that succeeded, then was rolled back on abort)
QUEUED, IN_PROGRESS, SUCCEEDED, FAILED, REJECTED, TIMED_OUT, CANCELED, ROLLED_BACK = (
    "QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "ROLLED_BACK")
TERMINAL = (SUCCEEDED, FAILED, REJECTED, TIMED_OUT, CANCELED, ROLLED_BACK)
EXECUTED = (SUCCEEDED, FAILED, REJECTED, TIMED_OUT)  # what abort thresholds count

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
  id TEXT PRIMARY KEY, name TEXT, plan TEXT, status TEXT, reason TEXT, created REAL, updated REAL,
  rate REAL, wave INTEGER, rate_counter INTEGER, rollback INTEGER DEFAULT 0, controller_pid INTEGER);
CREATE TABLE IF NOT EXISTS executions (
  rollout_id TEXT, device_id TEXT, seq INTEGER, link TEXT, status TEXT, attempts INTEGER, wave INTEGER,
  package TEXT, started REAL, updated REAL, reason TEXT, detail TEXT,
  PRIMARY KEY (rollout_id, device_id));
CREATE TABLE IF NOT EXISTS events (
  rollout_id TEXT, device_id TEXT, at REAL, status TEXT, message TEXT);
CREATE INDEX IF NOT EXISTS events_device ON events (rollout_id, device_id);
"""


@dataclass
class Execution:
    device_id: str
    link: str
    status: str = QUEUED
    attempts: int = 0
    wave: int | None = None
    package: str | None = None  # the package id sent
    started: float | None = None
    updated: float | None = None
    reason: str | None = None
    detail: dict | None = None

    def to_dict(self) -> dict:
        return {"device": self.device_id, "link": self.link, "status": self.status, "attempts": self.attempts,
                "wave": self.wave, "package": self.package, "started": self.started, "updated": self.updated,
                "reason": self.reason}


class RolloutDB:
    """The controller's state file. Thread-safe (one connection, a lock). Raises :class:`RolloutError`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise RolloutError(f"cannot open the rollout state {self.path}: {exc}",
                               hint="pass --db with a writable path") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        self.conn.close()

    # -- rollouts ------------------------------------------------------------------------------
    def create(self, name: str, plan: dict, devices: list[tuple[str, str]], rate: float) -> str:
        rid = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        now = time.time()
        with self._lock, self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("INSERT INTO rollouts (id, name, plan, status, created, updated, rate, wave, rate_counter)"
                              " VALUES (?, ?, ?, 'IN_PROGRESS', ?, ?, ?, 0, 0)",
                              (rid, name, json.dumps(plan), now, now, rate))
            self.conn.executemany("INSERT INTO executions (rollout_id, device_id, seq, link, status, attempts, updated) "
                                  "VALUES (?, ?, ?, ?, 'QUEUED', 0, ?)",
                                  [(rid, d, i, link, now) for i, (d, link) in enumerate(devices)])
        return rid

    def rollout(self, rid: str) -> dict:
        with self._lock:
            row = self.conn.execute("SELECT id, name, plan, status, reason, created, updated, rate, wave, rate_counter, "
                                    "rollback, controller_pid FROM rollouts WHERE id = ?", (rid,)).fetchone()
        if row is None:
            raise RolloutError(f"no rollout {rid!r} in {self.path}", hint="list them with `edgepeft rollout status`")
        keys = ("id", "name", "plan", "status", "reason", "created", "updated", "rate", "wave", "rate_counter",
                "rollback", "controller_pid")
        d = dict(zip(keys, row))
        d["plan"] = json.loads(d["plan"])
        return d

    def rollouts(self) -> list[dict]:
        with self._lock:
            rows = self.conn.execute("SELECT id, name, status, reason, created, updated FROM rollouts "
                                     "ORDER BY created").fetchall()
        return [dict(zip(("id", "name", "status", "reason", "created", "updated"), r)) for r in rows]

    def set_rollout(self, rid: str, **fields) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock, self.conn:
            self.conn.execute(f"UPDATE rollouts SET {cols}, updated = ? WHERE id = ?",
                              (*fields.values(), time.time(), rid))

    # -- executions ----------------------------------------------------------------------------
    def executions(self, rid: str) -> dict[str, Execution]:
        """The devices of a rollout in the order they are notified (the inventory's order)."""
        with self._lock:
            rows = self.conn.execute("SELECT device_id, link, status, attempts, wave, package, started, updated, "
                                     "reason, detail FROM executions WHERE rollout_id = ? ORDER BY seq",
                                     (rid,)).fetchall()
        return {r[0]: Execution(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                                json.loads(r[9]) if r[9] else None) for r in rows}

    def save(self, rid: str, changed: list[Execution], events: list[tuple[str, str, str]] = ()) -> None:
        """Write changed executions (and their events) in one transaction."""
        if not changed and not events:
            return
        now = time.time()
        with self._lock, self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "UPDATE executions SET status = ?, attempts = ?, wave = ?, package = ?, started = ?, updated = ?, "
                "reason = ?, detail = ? WHERE rollout_id = ? AND device_id = ?",
                [(e.status, e.attempts, e.wave, e.package, e.started, e.updated or now, e.reason,
                  json.dumps(e.detail) if e.detail else None, rid, e.device_id) for e in changed])
            self.conn.executemany("INSERT INTO events (rollout_id, device_id, at, status, message) VALUES (?, ?, ?, ?, ?)",
                                  [(rid, d, now, s, m) for d, s, m in events])

    def events(self, rid: str, device_id: str | None = None) -> list[dict]:
        q = "SELECT device_id, at, status, message FROM events WHERE rollout_id = ?"
        args: tuple = (rid,)
        if device_id:
            q += " AND device_id = ?"
            args += (device_id,)
        with self._lock:
            rows = self.conn.execute(q + " ORDER BY at", args).fetchall()
        return [dict(zip(("device", "at", "status", "message"), r)) for r in rows]
