"""The rollout controller: moves a fleet's devices through QUEUED -> IN_PROGRESS -> a final status, in waves.

One loop, ticking every few tens of milliseconds:

1. read what came back: HTTP/serial pushes finished in worker threads, MQTT execution updates;
2. time out executions IN_PROGRESS past ``in_progress_timeout_minutes`` (TIMED_OUT), requeue what the
   retry criteria allow;
3. check the canary (every canary device must succeed) and the abort criteria;
4. notify the next devices: the canary first, then waves at ``base_rate_per_minute`` growing by
   ``increment_factor`` each time ``rate_increase_criteria`` is met, up to ``maximum_per_minute``, never more
   than ``max_concurrency`` in progress;
5. write every change to SQLite, *then* act (push or publish).

A device counts as SUCCEEDED only once its agent reports the post-install health check passed. Resuming after
the controller was killed: IN_PROGRESS HTTP devices are asked for the package's status first (a device
answers a package it has finished from its history, so nothing installs twice); MQTT devices' retained
execution updates arrive again on subscribe.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgePeftError, RolloutError, TransportError
from .plan import Inventory, RolloutPlan
from .state import (
    CANCELED,
    EXECUTED,
    FAILED,
    IN_PROGRESS,
    QUEUED,
    REJECTED,
    ROLLED_BACK,
    SUCCEEDED,
    TERMINAL,
    TIMED_OUT,
    Execution,
    RolloutDB,
)

DEVICE_STATUS = {"healthy": SUCCEEDED, "rolled-back": FAILED, "rejected": REJECTED}


@dataclass(frozen=True)
class PackageInfo:
    """What the controller needs from a package (read untrusted: devices verify)."""

    path: Path
    id: str
    type: str
    name: str
    version: int
    base_fingerprint: str

    @property
    def target_path(self) -> str:
        return (f"edgepeft/adapters/{self.name}/v{self.version}.epu" if self.type == "adapter"
                else f"edgepeft/bundles/v{self.version}.epu")

    @classmethod
    def read(cls, path: Path) -> PackageInfo:
        from ..contracts.names import sha256_bytes
        from ..contracts.update import UpdateMeta, envelope_length, split_envelope

        data = Path(path).read_bytes()
        try:
            n = envelope_length(data, str(path))
            meta = UpdateMeta.from_dict(json.loads(split_envelope(data[:n], str(path))[0]), str(path))
        except (EdgePeftError, ValueError, TypeError) as exc:
            raise RolloutError(f"{path} is not a readable update package: {getattr(exc, 'message', exc)}",
                               hint="create it with `edgepeft update create`") from exc
        return cls(Path(path), sha256_bytes(data[:n]), meta.type, meta.name, meta.version, meta.base_fingerprint)


def start_rollout(plan: RolloutPlan | str | os.PathLike, db: str | os.PathLike, *, log=None) -> Rollout:
    """Check the plan (eval gate, devices, packages) and record a new rollout; raises :class:`RolloutError`."""
    from .gate import check_gate

    plan = plan if isinstance(plan, RolloutPlan) else RolloutPlan.load(plan)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    for line in check_gate(plan):
        say(line)
    inventory = Inventory.load(plan.inventory)
    devices = inventory.select(plan.groups, plan.tags, plan.device_ids)
    if not devices:
        raise RolloutError(f"plan {plan.name}: no device of {plan.inventory} matches its selection",
                           hint="check [select] groups/tags/devices against the inventory")
    if any(d.link == "mqtt" for d in devices) and plan.key is None:
        raise RolloutError(f"plan {plan.name} reaches MQTT devices but names no key to sign their jobs",
                           hint='add key = "keys/fleet.key" to the plan')
    for p in plan.packages:
        PackageInfo.read(p)
    store = RolloutDB(db)
    rid = store.create(plan.name, plan.to_dict() | {"_base": str(Path(plan.source).resolve().parent)},
                       [(d.id, d.link) for d in devices], plan.base_rate_per_minute)
    say(f"rollout {rid}: {len(devices)} devices, {len(plan.packages)} package(s)")
    return Rollout(store, rid, log=say)


def end_unstartable(db: RolloutDB, rid: str, row: dict, exc: EdgePeftError) -> None:
    """A rollout whose plan, inventory or packages can no longer be read ends here, with the reason: FAILED,
    or ABORTED when an abort was asked for (nothing can be sent, so nothing is left to stop)."""
    if row["status"] in ("SUCCEEDED", "COMPLETED", "ABORTED", "FAILED"):
        return
    aborted = row["status"] in ("ABORT_REQUESTED", "ABORTING")
    why = f"cannot start: {exc.message}"
    db.set_rollout(rid, status="ABORTED" if aborted else "FAILED",
                   reason=f"{row.get('reason') or 'aborted by request'}; {why}" if aborted else why)


class Rollout:
    """A rollout recorded in ``db``; :meth:`run` drives it to its end (or resumes it)."""

    def __init__(self, db: RolloutDB, rid: str, *, log=None, tick: float = 0.05, http_workers: int = 16):
        self.db, self.id = db, rid
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        row = db.rollout(rid)
        stored = row["plan"]
        try:
            self.plan = RolloutPlan.from_dict({k: v for k, v in stored.items()
                                               if not k.startswith("_") and v is not None},
                                              f"rollout {rid}", base=Path(stored.get("_base", ".")))
            self.inventory = Inventory.load(self.plan.inventory)
            self.packages = [PackageInfo.read(p) for p in self.plan.packages]
        except EdgePeftError as exc:
            end_unstartable(db, rid, row, exc)
            raise
        self.devices = {d.id: d for d in self.inventory.devices}
        self.ex: dict[str, Execution] = db.executions(rid)
        self.tick = tick
        self.status = row["status"]
        self.rate, self.wave = float(row["rate"] or self.plan.base_rate_per_minute), int(row["wave"] or 0)
        self.counter = int(row["rate_counter"] or 0)  # notified (or succeeded) toward the next rate increase
        self.rollback = bool(row["rollback"]) or self.plan.rollback_on_abort
        self.reason = row["reason"]
        self.rate_start, self.sent_in_rate = time.time(), 0
        self._pool = ThreadPoolExecutor(max(1, min(http_workers, self.plan.max_concurrency)),
                                        thread_name_prefix="edgepeft-rollout")
        self._futures: dict[str, Future] = {}
        self._plane = None
        self._changed: dict[str, Execution] = {}
        self._events: list[tuple[str, str, str]] = []
        self._actions: list = []
        self._private_key = None
        self.timeline: list[tuple[float, int, int]] = []  # (t, notified, terminal) for the progress plot
        self._stop = threading.Event()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _set(self, e: Execution, status: str, reason: str | None = None, **fields) -> None:
        e.status, e.updated = status, time.time()
        if reason is not None or status in TERMINAL:
            e.reason = reason
        for k, v in fields.items():
            setattr(e, k, v)
        self._changed[e.device_id] = e
        self._events.append((e.device_id, status, reason or ""))

    def _flush(self) -> None:
        """Persist every change of this tick (before any action is taken)."""
        self.db.save(self.id, list(self._changed.values()), self._events)
        self.db.set_rollout(self.id, status=self.status, reason=self.reason, rate=self.rate, wave=self.wave,
                            rate_counter=self.counter, rollback=int(self.rollback), controller_pid=os.getpid())
        self._changed, self._events = {}, []

    def counts(self) -> dict:
        out: dict[str, int] = {}
        for e in self.ex.values():
            out[e.status] = out.get(e.status, 0) + 1
        return out

    # -- links ---------------------------------------------------------------------------------
    def _packages_for(self, device_id: str) -> list[PackageInfo]:
        return self.packages  # one base per plan; several packages install in order

    def _key(self):
        if self._private_key is None:
            from ..contracts.signing import load_private_key

            self._private_key = load_private_key(self.plan.key)
        return self._private_key

    def _mqtt(self):
        if self._plane is None:
            from ..transport.mqtt_plane import ControlPlane

            self._plane = ControlPlane(self.inventory.mqtt_url, self.id, **self.inventory.mqtt_tls)
        return self._plane

    def _notify(self, e: Execution) -> None:
        """The action for one execution marked IN_PROGRESS (runs after the state was written)."""
        dev = self.devices.get(e.device_id)
        if dev is None:
            self._set(e, REJECTED, "the device is no longer in the inventory")
            return
        if dev.link == "mqtt":
            from ..contracts.job import new_job, sign_job

            pkg = self._packages_for(e.device_id)[-1]
            job = new_job(job_id=self.id, device_id=dev.id, operation="install", repository=self.inventory.repository_url,
                          package={"path": pkg.target_path, "id": pkg.id, "name": pkg.name, "version": pkg.version,
                                   "type": pkg.type})
            self._mqtt().send_job(dev.id, sign_job(job, self._key()))
        else:
            deadline = (e.started or time.time()) + self.plan.in_progress_timeout_minutes * 60
            self._futures[dev.id] = self._pool.submit(_push_all, dev, self._packages_for(dev.id), deadline)

    def _rollback_device(self, e: Execution) -> None:
        dev = self.devices.get(e.device_id)
        if dev is None:
            return
        if dev.link == "mqtt":
            from ..contracts.job import new_job, sign_job

            for pkg in self._packages_for(dev.id):
                job = new_job(job_id=f"{self.id}-rollback", device_id=dev.id, operation="rollback", name=pkg.name,
                              from_version=pkg.version)
                self._mqtt().client.publish(f"edgepeft/things/{dev.id}/jobs/{self.id}-rollback",
                                            sign_job(job, self._key()), qos=1, retain=True)
        else:
            self._futures[dev.id] = self._pool.submit(_rollback_all, dev, self._packages_for(dev.id))

    # -- the loop ------------------------------------------------------------------------------
    def run(self, *, timeout: float | None = None) -> dict:
        """Drive the rollout until every device has a final status (or ``timeout`` seconds pass);
        returns :meth:`report`. Safe to call again after a crash: it resumes."""
        t_end = None if timeout is None else time.time() + timeout
        self._resume()
        try:
            while not self._stop.is_set():
                self._step()
                if self._done():
                    break
                if t_end is not None and time.time() > t_end:
                    raise RolloutError(f"rollout {self.id} is still running after {timeout:.0f} s",
                                       hint=f"resume it: edgepeft rollout resume {self.id}")
                time.sleep(self.tick)
        finally:
            self._flush()
            self._close()
        return self.report()

    def _resume(self) -> None:
        """Pick up executions left IN_PROGRESS by a previous controller (nothing is sent twice blind)."""
        now = time.time()
        resumed = [e for e in self.ex.values() if e.status == IN_PROGRESS]
        for e in resumed:
            e.started = now  # the clock restarts: the device may have finished while nobody listened
            self._changed[e.device_id] = e
        self._flush()
        for e in resumed:
            if self.devices.get(e.device_id) and self.devices[e.device_id].link == "mqtt":
                self._mqtt()  # retained execution updates arrive on subscribe
            else:
                self._notify(e)  # a push asks the device for the package's status first
        if any(d.link == "mqtt" for d in self.devices.values() if d.id in self.ex):
            self._mqtt()

    def _done(self) -> bool:
        if any(e.status in (QUEUED, IN_PROGRESS) for e in self.ex.values()):
            return False
        if self._futures:
            return False
        limit = self.plan.in_progress_timeout_minutes * 60
        if any(e.status == SUCCEEDED and time.time() - (e.detail or {}).get("rollback_sent", 0) < limit
               for e in self.ex.values() if (e.detail or {}).get("rollback_sent")):
            return False  # rollbacks sent over MQTT: wait for their answers (up to the timeout)
        if self.status in ("IN_PROGRESS",):
            self.status = "SUCCEEDED" if all(e.status == SUCCEEDED for e in self.ex.values()) else "COMPLETED"
        elif self.status == "ABORTING":
            self.status = "ABORTED"
        self._flush()
        return True

    def _step(self) -> None:
        now = time.time()
        row = self.db.rollout(self.id)
        if row["status"] == "ABORT_REQUESTED" and self.status not in ("ABORTING", "ABORTED"):
            self._abort(row["reason"] or "aborted by request", rollback=bool(row["rollback"]))
        self._collect()
        for e in self.ex.values():
            if e.status == IN_PROGRESS and e.started and now - e.started > self.plan.in_progress_timeout_minutes * 60:
                if e.device_id in self._futures:
                    continue  # the push itself stops at the deadline and reports
                self._finish(e, TIMED_OUT, "the device did not report a result in time")
        self._check_abort()
        if self.status == "IN_PROGRESS":
            self._schedule(now)
        elif self.status == "ABORTING":
            for e in self.ex.values():
                if e.status == QUEUED:
                    self._set(e, CANCELED, f"rollout aborted: {self.reason}")
                if self.rollback and e.status == SUCCEEDED and not (e.detail or {}).get("rollback_sent"):
                    e.detail = (e.detail or {}) | {"rollback_sent": time.time()}
                    self._changed[e.device_id] = e
                    self._actions.append(("rollback", e))
        self.timeline.append((now, sum(1 for e in self.ex.values() if e.status != QUEUED),
                              sum(1 for e in self.ex.values() if e.status in TERMINAL)))
        actions, self._actions = self._actions, []
        self._flush()  # the state is written before anything is sent
        for kind, e in actions:
            (self._notify if kind == "notify" else self._rollback_device)(e)

    def _schedule(self, now: float) -> None:
        queued = [e for e in self.ex.values() if e.status == QUEUED]
        if not queued:
            return
        busy = sum(1 for e in self.ex.values() if e.status == IN_PROGRESS)
        room = self.plan.max_concurrency - busy
        canary = [e for e in self.ex.values() if e.wave == 0]
        if self.wave == 0 and self.plan.canary > 0:
            want = self.plan.canary - len(canary)
            if want > 0:
                for e in queued[:min(want, room)]:
                    self._start(e, 0)
                return
            if any(e.status not in TERMINAL for e in canary):
                return  # wait for the canary
            self.wave, self.rate_start, self.sent_in_rate, self.counter = 1, now, 0, 0
            self.log(f"canary succeeded ({len(canary)} device(s)): wave 1 at {self.rate:.0f} devices/min")
        elif self.wave == 0:
            self.wave, self.rate_start, self.sent_in_rate = 1, now, 0
        allowed = int(min(self.rate, self.plan.maximum_per_minute) * (now - self.rate_start) / 60) + 1 - self.sent_in_rate
        for e in queued[:max(0, min(allowed, room))]:
            self._start(e, self.wave)
            self.sent_in_rate += 1
            if self.plan.number_of_notified_things:
                self.counter += 1
        self._grow(now)

    def _grow(self, now: float) -> None:
        goal = self.plan.number_of_notified_things or self.plan.number_of_succeeded_things
        if goal and self.counter >= goal and self.rate < self.plan.maximum_per_minute:
            self.rate = min(self.rate * self.plan.increment_factor, self.plan.maximum_per_minute)
            self.wave += 1
            self.counter, self.rate_start, self.sent_in_rate = 0, now, 0
            self.log(f"wave {self.wave}: {self.rate:.0f} devices/min")

    def _start(self, e: Execution, wave: int) -> None:
        self._set(e, IN_PROGRESS, None, attempts=e.attempts + 1, wave=wave if e.wave is None else e.wave,
                  started=time.time(), package=",".join(p.id[:16] for p in self._packages_for(e.device_id)))
        self._actions.append(("notify", e))

    def _finish(self, e: Execution, status: str, reason: str | None, transient: bool = False,
                detail: dict | None = None) -> None:
        kind = TIMED_OUT if status == TIMED_OUT else FAILED
        allowed = self.plan.retries.get(kind, self.plan.retries.get("ALL", 0))
        if (status == TIMED_OUT or (status == FAILED and transient)) and e.attempts <= allowed \
                and self.status == "IN_PROGRESS":
            self._set(e, QUEUED, f"retrying after: {reason}", detail=detail)
            return
        self._set(e, status, reason, detail=detail)
        if status == SUCCEEDED and self.plan.number_of_succeeded_things:
            self.counter += 1

    def _collect(self) -> None:
        for dev_id, fut in list(self._futures.items()):
            if not fut.done():
                continue
            del self._futures[dev_id]
            e = self.ex[dev_id]
            try:
                kind, st = fut.result()
            except Exception as exc:  # a bug in a link must not stop the rollout
                kind, st = "error", {"reason": f"{type(exc).__name__}: {exc}"}
            if kind == "rollback":
                self._set(e, ROLLED_BACK if st.get("ok") else e.status, st.get("reason"))
                continue
            if e.status != IN_PROGRESS:
                continue
            if kind == "final":
                self._finish(e, DEVICE_STATUS.get(st.get("status"), FAILED), st.get("reason"),
                             transient=bool(st.get("retryable")), detail={"steps": st.get("steps")})
            elif kind == "timeout":
                self._finish(e, TIMED_OUT, st.get("reason"))
            else:
                self._finish(e, FAILED, st.get("reason"), transient=True)
        if self._plane is not None:
            for dev_id, up in self._plane.drain():
                e = self.ex.get(dev_id)
                if e is None:
                    continue
                status = up.get("status")
                if str(up.get("job_id", "")).endswith("-rollback"):
                    if status in (SUCCEEDED, REJECTED, FAILED) and e.status == SUCCEEDED:
                        self._set(e, ROLLED_BACK if status == SUCCEEDED else e.status, up.get("reason"))
                    continue
                if e.status != IN_PROGRESS:
                    continue
                if status in (SUCCEEDED, FAILED, REJECTED):
                    self._finish(e, status, up.get("reason"), transient=bool(up.get("transient")),
                                 detail={"steps": (up.get("result") or {}).get("steps")})
                    self._plane.clear_job(dev_id)

    def _check_abort(self) -> None:
        if self.status != "IN_PROGRESS":
            return
        canary = [e for e in self.ex.values() if e.wave == 0 and e.status in TERMINAL]
        bad = [e for e in canary if e.status != SUCCEEDED]
        if bad:
            e = bad[0]
            self._abort(f"canary device {e.device_id} ended {e.status}: {e.reason or ''}".strip(),
                        rollback=self.plan.rollback_on_abort)
            return
        executed = [e for e in self.ex.values() if e.status in EXECUTED]
        for c in self.plan.abort:
            if len(executed) < c.min_number_of_executed_things:
                continue
            kinds = (FAILED, REJECTED, TIMED_OUT) if c.failure_type == "ALL" else (c.failure_type,)
            failed = sum(1 for e in executed if e.status in kinds)
            pct = 100.0 * failed / len(executed)
            if pct >= c.threshold_percentage:
                self._abort(f"{failed} of {len(executed)} executed devices ended {c.failure_type} ({pct:.0f} % >= "
                            f"{c.threshold_percentage:g} %)", rollback=self.plan.rollback_on_abort)
                return

    def _abort(self, reason: str, rollback: bool) -> None:
        self.status, self.reason = "ABORTING", reason
        self.rollback = self.rollback or rollback
        self.log(f"abort: {reason}" + (" (rolling back devices already updated)" if self.rollback else ""))

    def _close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._plane is not None:
            if self.status in ("SUCCEEDED", "COMPLETED", "ABORTED"):
                for e in self.ex.values():
                    if e.link == "mqtt":
                        self._plane.clear_job(e.device_id)
            self._plane.close()
            self._plane = None

    def stop(self) -> None:
        self._stop.set()

    # -- reporting -----------------------------------------------------------------------------
    def report(self) -> dict:
        devices = []
        for dev_id, e in sorted(self.ex.items()):
            d = self.devices.get(dev_id)
            devices.append(e.to_dict() | {"group": d.group if d else None})
        return {"id": self.id, "name": self.plan.name, "status": self.status, "reason": self.reason,
                "counts": self.counts(), "rate_per_minute": self.rate, "waves": self.wave, "devices": devices}


def _push_all(dev, packages: list[PackageInfo], deadline: float) -> tuple[str, dict]:
    """Runs in a worker thread: push each package to an HTTP/serial device until it is final or the
    deadline passes. Returns ("final", status of the last package) or ("timeout", why)."""
    from ..transport.link import Package, push
    from ..transport.open import open_link

    st: dict = {}
    last_error = "no answer"
    for info in packages:
        while True:
            left = deadline - time.time()
            if left <= 0:
                return "timeout", {"reason": f"no result before the deadline ({last_error})"}
            try:
                link = open_link(dev.address, None, dev.token_file)
            except EdgePeftError as exc:
                return "final", {"status": "rejected", "reason": exc.message}
            try:
                st = push(Package.read(info.path), link, timeout=left, resume_for=left)
                break
            except TransportError as exc:
                last_error = exc.message
                time.sleep(min(1.0, max(0.0, deadline - time.time())))
            finally:
                link.close()
        if st.get("status") != "healthy":
            return "final", st
    return "final", st


def _rollback_all(dev, packages: list[PackageInfo]) -> tuple[str, dict]:
    from ..transport.open import open_link

    try:
        link = open_link(dev.address, None, dev.token_file)
        try:
            for info in reversed(packages):
                link.rollback(info.name if info.type == "adapter" else "bundle")
        finally:
            link.close()
    except EdgePeftError as exc:
        return "rollback", {"ok": False, "reason": f"rollback failed: {exc.message}"}
    return "rollback", {"ok": True, "reason": "rolled back after the abort"}
