"""The rollout controller: moves a fleet's devices through QUEUED -> IN_PROGRESS -> a final status, in waves.

One loop, ticking every few tens of milliseconds:

1. read what came back into the policy: HTTP/serial pushes finished in worker threads, MQTT execution updates;
2. let the policy (:mod:`edgepeft.fleet.policy`: waves, rate, concurrency, timeouts, retries, canary and
   abort criteria, all without a link or a clock of its own) decide whom to start or roll back;
3. write every change to SQLite, *then* act (push or publish).

A device counts as SUCCEEDED only once its agent reports the post-install health check passed; over MQTT,
only a report signed by the device's enrolled key, for this rollout, counts (:mod:`.reports`). Resuming after
the controller was killed: IN_PROGRESS HTTP devices are asked for the package's status first (a device
answers a package it has finished from its history, so nothing installs twice); MQTT devices' retained
execution updates arrive again on subscribe.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgePeftError, RolloutError, TransportError
from .plan import Inventory, RolloutPlan
from .policy import NOTIFY, RolloutPolicy
from .state import (
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
        """The package's path in the TUF repository, as ``edgepeft publish`` puts it there."""
        from ..contracts.update import repository_path

        return repository_path(self)

    @classmethod
    def read(cls, path: Path) -> PackageInfo:
        from ..contracts.names import sha256_bytes
        from ..contracts.update import envelope_length, read_metadata_unverified

        data = Path(path).read_bytes()
        try:
            n = envelope_length(data, str(path))
            meta = read_metadata_unverified(data, str(path))
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
    unenrolled = [d.id for d in devices if d.link == "mqtt" and d.public_key is None]
    if unenrolled:
        few = ", ".join(unenrolled[:5]) + (f" and {len(unenrolled) - 5} more" if len(unenrolled) > 5 else "")
        raise RolloutError(f"plan {plan.name}: MQTT device(s) {few} have no enrolled key in {plan.inventory}, so "
                           "nothing they report could be trusted",
                           hint='run `edgepeft identity --state STATE` on each device and add its output as '
                                'public_key = "ed25519:..." to its [[device]] (docs/fleet.md)')
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
    """A rollout recorded in ``db``; :meth:`run` drives it to its end (or resumes it).

    The decisions are :class:`~edgepeft.fleet.policy.RolloutPolicy`'s (``self.policy``); this class
    reads what the links report into it, writes its changes to SQLite, then acts on the links.
    """

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
        self.policy = RolloutPolicy(self.plan, db.executions(rid), now=time.time(), status=row["status"],
                                    reason=row["reason"], rate=row["rate"], wave=int(row["wave"] or 0),
                                    counter=int(row["rate_counter"] or 0), rollback=bool(row["rollback"]),
                                    package=",".join(p.id[:16] for p in self.packages), log=self.log)
        self.tick = tick
        self._pool = ThreadPoolExecutor(max(1, min(http_workers, self.plan.max_concurrency)),
                                        thread_name_prefix="edgepeft-rollout")
        self._futures: dict[str, Future] = {}
        self._plane = None
        self._dropped: dict = {}  # messages the plane dropped unread, by reason
        self._reports = None  # the check of MQTT reports (fleet/reports.py), with the plane
        self._private_key = None
        self.timeline: list[tuple[float, int, int]] = []  # (t, notified, terminal) for the progress plot
        self._stop = threading.Event()

    # what the policy decides, readable as before
    @property
    def executions(self) -> dict[str, Execution]:
        return self.policy.executions

    @property
    def status(self) -> str:
        return self.policy.status

    @property
    def reason(self) -> str | None:
        return self.policy.reason

    @property
    def rate(self) -> float:
        return self.policy.rate

    @property
    def wave(self) -> int:
        return self.policy.wave

    def counts(self) -> dict:
        return self.policy.counts()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _flush(self) -> None:
        """Persist every change of this tick (before any action is taken)."""
        p = self.policy
        changed, events = p.take_changes()
        self.db.save(self.id, changed, events)
        self.db.set_rollout(self.id, status=p.status, reason=p.reason, rate=p.rate, wave=p.wave,
                            rate_counter=p.counter, rollback=int(p.rollback), controller_pid=os.getpid())

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

            self._reports = self._reports or _report_gate(self)
            self._plane = ControlPlane(self.inventory.mqtt_url, self.id, **self.inventory.mqtt_tls,
                                       devices=list(self.executions))
        return self._plane

    def _notify(self, e: Execution) -> None:
        """The action for one execution marked IN_PROGRESS (runs after the state was written)."""
        dev = self.devices.get(e.device_id)
        if dev is None:
            self.policy.set(e, REJECTED, "the device is no longer in the inventory", now=time.time())
            return
        if dev.link == "mqtt":
            from ..contracts.job import new_job, sign_job

            pkg = self._packages_for(e.device_id)[-1]
            job = new_job(job_id=self.id, rollout=self.id, device_id=dev.id, operation="install",
                          repository=self.inventory.repository_url,
                          package={"path": pkg.target_path, "id": pkg.id, "name": pkg.name, "version": pkg.version,
                                   "type": pkg.type})
            self._mqtt().send_job(dev.id, sign_job(job, self._key()))
        else:
            deadline = (e.started or time.time()) + self.policy.timeout
            self._futures[dev.id] = self._pool.submit(_push_all, dev, self._packages_for(dev.id), deadline)

    def _rollback_device(self, e: Execution) -> None:
        dev = self.devices.get(e.device_id)
        if dev is None:
            return
        if dev.link == "mqtt":
            from ..contracts.job import new_job, sign_job

            for pkg in self._packages_for(dev.id):
                job = new_job(job_id=f"{self.id}-rollback", rollout=self.id, device_id=dev.id, operation="rollback",
                              name=pkg.name, from_version=pkg.version)
                self._mqtt().send_job(dev.id, sign_job(job, self._key()), job_id=f"{self.id}-rollback")
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
        resumed = self.policy.resume(time.time())
        self._flush()
        for e in resumed:
            if self.devices.get(e.device_id) and self.devices[e.device_id].link == "mqtt":
                self._mqtt()  # retained execution updates arrive on subscribe
            else:
                self._notify(e)  # a push asks the device for the package's status first
        if any(d.link == "mqtt" for d in self.devices.values() if d.id in self.executions):
            self._mqtt()

    def _done(self) -> bool:
        if not self.policy.done(time.time(), links_busy=bool(self._futures)):
            return False
        self._flush()
        return True

    def _step(self) -> None:
        now = time.time()
        row = self.db.rollout(self.id)
        if row["status"] == "ABORT_REQUESTED" and self.status not in ("ABORTING", "ABORTED"):
            self.policy.abort(row["reason"] or "aborted by request", rollback=bool(row["rollback"]))
        self._collect(now)
        actions = self.policy.step(now, in_flight=self._futures)
        self.timeline.append((now, sum(1 for e in self.executions.values() if e.status != QUEUED),
                              sum(1 for e in self.executions.values() if e.status in TERMINAL)))
        self._flush()  # the state is written before anything is sent
        for kind, e in actions:
            (self._notify if kind == NOTIFY else self._rollback_device)(e)

    def _collect(self, now: float) -> None:
        """Read what the links reported into the policy: finished pushes and MQTT execution updates."""
        p = self.policy
        for dev_id, fut in list(self._futures.items()):
            if not fut.done():
                continue
            del self._futures[dev_id]
            e = self.executions[dev_id]
            try:
                kind, st = fut.result()
            except Exception as exc:  # a bug in a link must not stop the rollout
                kind, st = "error", {"reason": f"{type(exc).__name__}: {exc}"}
            if kind == "rollback":
                p.set(e, ROLLED_BACK if st.get("ok") else e.status, st.get("reason"), now=now)
                continue
            if e.status != IN_PROGRESS:
                continue
            if kind == "final":
                p.finish(e, DEVICE_STATUS.get(st.get("status"), FAILED), st.get("reason"), now=now,
                         transient=bool(st.get("retryable")), detail={"steps": st.get("steps")})
            elif kind == "timeout":
                p.finish(e, TIMED_OUT, st.get("reason"), now=now)
            else:
                p.finish(e, FAILED, st.get("reason"), now=now, transient=True)
        if self._plane is not None:
            for msg in self._plane.drain():
                up = self._reports.check(msg)
                if up is None or up.type != "execution-update":
                    continue  # refused (counted in the report), or a device's state
                e = self.executions.get(msg.device_id)
                if e is None:
                    continue
                if up.job_id.endswith("-rollback"):
                    if up.status in (SUCCEEDED, REJECTED, FAILED) and e.status == SUCCEEDED:
                        p.set(e, ROLLED_BACK if up.status == SUCCEEDED else e.status, up.reason, now=now)
                    continue
                if e.status != IN_PROGRESS:
                    continue
                if up.status in (SUCCEEDED, FAILED, REJECTED):
                    p.finish(e, up.status, up.reason, now=now, transient=up.transient,
                             detail={"steps": (up.result or {}).get("steps")})
                    self._plane.clear_job(msg.device_id)

    def _close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._plane is not None:
            if self.status in ("SUCCEEDED", "COMPLETED", "ABORTED"):
                for e in self.executions.values():
                    if e.link == "mqtt":
                        self._plane.clear_job(e.device_id)
            self._dropped = dict(self._plane.dropped)
            self._plane.close()
            self._plane = None

    def stop(self) -> None:
        self._stop.set()

    # -- reporting -----------------------------------------------------------------------------
    def report(self) -> dict:
        devices = []
        for dev_id, e in sorted(self.executions.items()):
            d = self.devices.get(dev_id)
            devices.append(e.to_dict() | {"group": d.group if d else None})
        refused = dict(self._reports.refused) if self._reports is not None else {}
        return {"id": self.id, "name": self.plan.name, "status": self.status, "reason": self.reason,
                "counts": self.counts(), "rate_per_minute": self.rate, "waves": self.wave, "devices": devices,
                "refused": refused | self._dropped}


def _report_gate(rollout: Rollout):
    """The check of MQTT reports for ``rollout``: each device's enrolled key (see :mod:`.reports`)."""
    from ..contracts.identity import load_public_key_text
    from .reports import ReportGate

    keys = {d.id: load_public_key_text(d.public_key) for d in rollout.devices.values()
            if d.public_key and d.id in rollout.executions}
    return ReportGate(rollout.id, keys, log=rollout.log)


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
