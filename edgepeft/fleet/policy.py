"""A rollout's decisions, apart from its links and its clock: whom to start next, when a device has
timed out, when to retry, when to abort, when the rollout is over.

Why apart: the same rules (AWS IoT Jobs' rollout, timeout, retry and abort configs) must hold whatever
carries the jobs, and must be testable without devices or waiting: every method takes ``now`` (seconds,
any clock) and only changes :class:`~edgepeft.fleet.state.Execution` objects in memory. The controller
(:mod:`edgepeft.fleet.controller`) writes :meth:`RolloutPolicy.take_changes` to SQLite, then acts.

Rules:

- the canary (``plan.canary`` devices, wave 0) goes first; every canary device must succeed;
- then waves at ``base_rate_per_minute``, multiplied by ``increment_factor`` each time
  ``number_of_notified_things`` were notified (or ``number_of_succeeded_things`` succeeded), up to
  ``maximum_per_minute``; never more than ``max_concurrency`` devices IN_PROGRESS;
- a device IN_PROGRESS longer than ``in_progress_timeout_minutes`` is TIMED_OUT (unless its link
  still runs: a push stops at the same deadline and reports itself);
- TIMED_OUT and transient failures are QUEUED again while ``plan.retries`` allows;
- an abort criterion met (or a canary device that did not succeed) aborts: queued devices are
  CANCELED and, with ``rollback``, devices that succeeded are rolled back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .plan import RolloutPlan
from .state import CANCELED, EXECUTED, FAILED, IN_PROGRESS, QUEUED, REJECTED, SUCCEEDED, TERMINAL, TIMED_OUT, Execution

NOTIFY, ROLLBACK = "notify", "rollback"


class RolloutPolicy:
    """The decisions of one rollout over ``executions`` (device id -> :class:`Execution`).

    ``status`` ("IN_PROGRESS", "ABORTING", then "SUCCEEDED", "COMPLETED" or "ABORTED"), ``reason``,
    ``rate``, ``wave``, ``counter`` and ``rollback`` are what a controller persists and restores;
    ``package`` labels the executions started (the package ids sent).
    """

    def __init__(self, plan: RolloutPlan, executions: dict[str, Execution], *, now: float,
                 status: str = "IN_PROGRESS", reason: str | None = None, rate: float | None = None, wave: int = 0,
                 counter: int = 0, rollback: bool = False, package: str | None = None,
                 log: Callable[[str], None] | None = None):
        self.plan, self.executions = plan, executions
        self.status, self.reason = status, reason
        self.rate = float(rate or plan.base_rate_per_minute)
        self.wave, self.counter = int(wave), int(counter)  # counter: notified (or succeeded) toward the next rate
        self.rollback = bool(rollback) or plan.rollback_on_abort
        self.package = package
        self.rate_start, self.sent_in_rate = now, 0
        self.log = log or (lambda msg: None)
        self._changed: dict[str, Execution] = {}
        self._events: list[tuple[str, str, str]] = []

    @property
    def timeout(self) -> float:
        """Seconds a device may stay IN_PROGRESS."""
        return self.plan.in_progress_timeout_minutes * 60

    # -- changes ---------------------------------------------------------------------------------
    def set(self, e: Execution, status: str, reason: str | None = None, *, now: float, **fields) -> None:
        """Move ``e`` to ``status`` (a final status clears an old reason), recording the change."""
        e.status, e.updated = status, now
        if reason is not None or status in TERMINAL:
            e.reason = reason
        for k, v in fields.items():
            setattr(e, k, v)
        self.touch(e)
        self._events.append((e.device_id, status, reason or ""))

    def touch(self, e: Execution) -> None:
        """Record that ``e`` changed (without an event), so it is written with the rest."""
        self._changed[e.device_id] = e

    def take_changes(self) -> tuple[list[Execution], list[tuple[str, str, str]]]:
        """The executions changed and the events since the last call (the controller writes them)."""
        changed, events = list(self._changed.values()), self._events
        self._changed, self._events = {}, []
        return changed, events

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.executions.values():
            out[e.status] = out.get(e.status, 0) + 1
        return out

    # -- what devices report -----------------------------------------------------------------------
    def finish(self, e: Execution, status: str, reason: str | None, *, now: float, transient: bool = False,
               detail: dict | None = None) -> None:
        """A device's final word for its execution: QUEUED again when a retry is allowed, else ``status``."""
        kind = TIMED_OUT if status == TIMED_OUT else FAILED
        allowed = self.plan.retries.get(kind, self.plan.retries.get("ALL", 0))
        if (status == TIMED_OUT or (status == FAILED and transient)) and e.attempts <= allowed \
                and self.status == "IN_PROGRESS":
            self.set(e, QUEUED, f"retrying after: {reason}", now=now, detail=detail)
            return
        self.set(e, status, reason, now=now, detail=detail)
        if status == SUCCEEDED and self.plan.number_of_succeeded_things:
            self.counter += 1

    def abort(self, reason: str, rollback: bool) -> None:
        self.status, self.reason = "ABORTING", reason
        self.rollback = self.rollback or rollback
        self.log(f"abort: {reason}" + (" (rolling back devices already updated)" if self.rollback else ""))

    def resume(self, now: float) -> list[Execution]:
        """After a controller restart: the executions left IN_PROGRESS, their clocks restarted (a device may
        have finished while nobody listened)."""
        resumed = [e for e in self.executions.values() if e.status == IN_PROGRESS]
        for e in resumed:
            e.started = now
            self.touch(e)
        return resumed

    # -- one tick ----------------------------------------------------------------------------------
    def step(self, now: float, in_flight: Iterable[str] = ()) -> list[tuple[str, Execution]]:
        """Time out, check the abort criteria, then start (or, aborting, wind down) devices. Returns the
        actions to take once the changes are written: (``NOTIFY`` | ``ROLLBACK``, execution).
        ``in_flight``: devices whose link still runs (they report their own timeout)."""
        self.expire(now, in_flight)
        self.check_abort()
        if self.status == "IN_PROGRESS":
            return [(NOTIFY, e) for e in self.schedule(now)]
        if self.status == "ABORTING":
            return [(ROLLBACK, e) for e in self.wind_down(now)]
        return []

    def expire(self, now: float, in_flight: Iterable[str] = ()) -> None:
        """TIMED_OUT for every device IN_PROGRESS past the timeout whose link is not still running."""
        busy = set(in_flight)
        for e in self.executions.values():
            if e.status == IN_PROGRESS and e.started is not None and now - e.started > self.timeout \
                    and e.device_id not in busy:
                self.finish(e, TIMED_OUT, "the device did not report a result in time", now=now)

    def check_abort(self) -> None:
        if self.status != "IN_PROGRESS":
            return
        canary = [e for e in self.executions.values() if e.wave == 0 and e.status in TERMINAL]
        bad = [e for e in canary if e.status != SUCCEEDED]
        if bad:
            e = bad[0]
            self.abort(f"canary device {e.device_id} ended {e.status}: {e.reason or ''}".strip(),
                       rollback=self.plan.rollback_on_abort)
            return
        executed = [e for e in self.executions.values() if e.status in EXECUTED]
        for c in self.plan.abort:
            if len(executed) < c.min_number_of_executed_things:
                continue
            kinds = (FAILED, REJECTED, TIMED_OUT) if c.failure_type == "ALL" else (c.failure_type,)
            failed = sum(1 for e in executed if e.status in kinds)
            pct = 100.0 * failed / len(executed)
            if pct >= c.threshold_percentage:
                self.abort(f"{failed} of {len(executed)} executed devices ended {c.failure_type} ({pct:.0f} % >= "
                           f"{c.threshold_percentage:g} %)", rollback=self.plan.rollback_on_abort)
                return

    def schedule(self, now: float) -> list[Execution]:
        """The devices to start now (marked IN_PROGRESS): the canary, then the current wave's rate."""
        started: list[Execution] = []
        queued = [e for e in self.executions.values() if e.status == QUEUED]
        if not queued:
            return started
        busy = sum(1 for e in self.executions.values() if e.status == IN_PROGRESS)
        room = self.plan.max_concurrency - busy
        canary = [e for e in self.executions.values() if e.wave == 0]
        if self.wave == 0 and self.plan.canary > 0:
            want = self.plan.canary - len(canary)
            if want > 0:
                for e in queued[:min(want, room)]:
                    started.append(self._start(e, 0, now))
                return started
            if any(e.status not in TERMINAL for e in canary):
                return started  # wait for the canary
            self.wave, self.rate_start, self.sent_in_rate, self.counter = 1, now, 0, 0
            self.log(f"canary succeeded ({len(canary)} device(s)): wave 1 at {self.rate:.0f} devices/min")
        elif self.wave == 0:
            self.wave, self.rate_start, self.sent_in_rate = 1, now, 0
        allowed = int(min(self.rate, self.plan.maximum_per_minute) * (now - self.rate_start) / 60) + 1 - self.sent_in_rate
        for e in queued[:max(0, min(allowed, room))]:
            started.append(self._start(e, self.wave, now))
            self.sent_in_rate += 1
            if self.plan.number_of_notified_things:
                self.counter += 1
        self._grow(now)
        return started

    def _grow(self, now: float) -> None:
        goal = self.plan.number_of_notified_things or self.plan.number_of_succeeded_things
        if goal and self.counter >= goal and self.rate < self.plan.maximum_per_minute:
            self.rate = min(self.rate * self.plan.increment_factor, self.plan.maximum_per_minute)
            self.wave += 1
            self.counter, self.rate_start, self.sent_in_rate = 0, now, 0
            self.log(f"wave {self.wave}: {self.rate:.0f} devices/min")

    def _start(self, e: Execution, wave: int, now: float) -> Execution:
        self.set(e, IN_PROGRESS, None, now=now, attempts=e.attempts + 1, wave=wave if e.wave is None else e.wave,
                 started=now, package=self.package)
        return e

    def wind_down(self, now: float) -> list[Execution]:
        """Aborting: cancel what is queued; return the devices that succeeded and must be rolled back
        (each once: marked ``rollback_sent``)."""
        out = []
        for e in self.executions.values():
            if e.status == QUEUED:
                self.set(e, CANCELED, f"rollout aborted: {self.reason}", now=now)
            if self.rollback and e.status == SUCCEEDED and not (e.detail or {}).get("rollback_sent"):
                e.detail = (e.detail or {}) | {"rollback_sent": now}
                self.touch(e)
                out.append(e)
        return out

    def done(self, now: float, links_busy: bool = False) -> bool:
        """Whether every device has its final status (and no link or sent rollback is still pending);
        sets the rollout's final status when it is."""
        if links_busy or any(e.status in (QUEUED, IN_PROGRESS) for e in self.executions.values()):
            return False
        if any(e.status == SUCCEEDED and now - (e.detail or {}).get("rollback_sent", 0) < self.timeout
               for e in self.executions.values() if (e.detail or {}).get("rollback_sent")):
            return False  # rollbacks sent over MQTT: wait for their answers (up to the timeout)
        if self.status == "IN_PROGRESS":
            self.status = "SUCCEEDED" if all(e.status == SUCCEEDED for e in self.executions.values()) else "COMPLETED"
        elif self.status == "ABORTING":
            self.status = "ABORTED"
        return True
