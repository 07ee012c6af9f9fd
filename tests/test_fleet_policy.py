"""The rollout policy driven by a fake clock, with no link and no waiting: the canary first, waves at a
rate that grows, the concurrency cap, a silent device TIMED_OUT (and retried when the plan allows),
the abort threshold cancelling the rest and rolling back what succeeded."""

from __future__ import annotations

from pathlib import Path

from edgepeft.fleet.plan import AbortCriterion, RolloutPlan
from edgepeft.fleet.policy import NOTIFY, ROLLBACK, RolloutPolicy
from edgepeft.fleet.state import (
    CANCELED,
    FAILED,
    IN_PROGRESS,
    QUEUED,
    SUCCEEDED,
    TIMED_OUT,
    Execution,
)


def _policy(n: int, **plan) -> RolloutPolicy:
    plan = RolloutPlan(name="t", inventory=Path("inventory.toml"), packages=(), **plan)
    ex = {f"d{i}": Execution(f"d{i}", "http") for i in range(n)}
    return RolloutPolicy(plan, ex, now=0.0, package="p")


def _started(actions) -> list[str]:
    assert all(kind == NOTIFY for kind, _ in actions)
    return [e.device_id for _, e in actions]


def test_canary_then_waves_at_a_growing_rate_within_the_concurrency_cap():
    p = _policy(6, canary=1, base_rate_per_minute=60, increment_factor=2, number_of_notified_things=2,
                max_concurrency=2, in_progress_timeout_minutes=10)
    assert _started(p.step(0.0)) == ["d0"] and p.executions["d0"].wave == 0 and p.executions["d0"].status == IN_PROGRESS
    assert _started(p.step(5.0)) == []  # nobody else before the canary succeeds
    p.finish(p.executions["d0"], SUCCEEDED, None, now=6.0)
    assert _started(p.step(6.0)) == ["d1"] and p.wave == 1  # wave 1: one device per second at 60/min
    assert _started(p.step(6.5)) == []
    assert _started(p.step(7.0)) == ["d2"]  # two notified: the rate doubles, wave 2
    assert (p.wave, p.rate) == (2, 120.0)
    assert _started(p.step(60.0)) == []  # d1 and d2 in progress: the cap of 2 holds whatever the rate allows
    p.finish(p.executions["d1"], SUCCEEDED, None, now=61.0)
    assert _started(p.step(61.0)) == ["d3"]
    changed, events = p.take_changes()
    assert {e.device_id for e in changed} == {"d0", "d1", "d2", "d3"}
    assert ("d1", SUCCEEDED, "") in events and all(e.package == "p" for e in changed)
    assert p.take_changes() == ([], [])


def test_a_silent_device_times_out_unless_its_link_still_runs_and_is_retried_when_allowed():
    p = _policy(2, canary=0, base_rate_per_minute=600, in_progress_timeout_minutes=1, retries={"TIMED_OUT": 1})
    assert _started(p.step(0.0)) == ["d0"]
    assert _started(p.step(0.1)) == ["d1"]
    p.step(59.0)
    assert p.executions["d0"].status == IN_PROGRESS  # within the minute
    p.step(61.0, in_flight={"d0", "d1"})
    assert p.executions["d0"].status == IN_PROGRESS  # a push runs to the same deadline and reports itself
    actions = p.step(61.0)  # first timeout: queued again (one retry allowed), and started again at once
    assert _started(actions) == ["d0", "d1"] and p.executions["d0"].attempts == 2
    p.step(122.0)
    assert p.executions["d0"].status == TIMED_OUT and "did not report" in p.executions["d0"].reason
    assert p.done(122.0) and p.status == "COMPLETED"


def test_the_abort_threshold_cancels_the_queue_and_rolls_back_what_succeeded():
    p = _policy(6, canary=0, base_rate_per_minute=600, max_concurrency=3, rollback_on_abort=True,
                abort=(AbortCriterion("FAILED", 50.0, 2),))
    assert _started(p.step(0.0)) == ["d0"]
    assert _started(p.step(0.2)) == ["d1", "d2"]
    p.finish(p.executions["d0"], SUCCEEDED, None, now=1.0)
    assert _started(p.step(1.0)) == ["d3"]  # one executed: under the criterion's minimum; d0's place is taken
    assert p.status == "IN_PROGRESS"
    p.finish(p.executions["d1"], FAILED, "health check failed", now=2.0)
    actions = p.step(2.0)  # 1 of 2 failed: 50 % >= 50 %
    assert p.status == "ABORTING" and "1 of 2 executed devices ended FAILED" in p.reason
    assert actions == [(ROLLBACK, p.executions["d0"])] and p.executions["d0"].detail["rollback_sent"] == 2.0
    assert [p.executions[d].status for d in ("d4", "d5")] == [CANCELED, CANCELED]
    assert p.step(3.0) == []  # each rollback is sent once
    p.finish(p.executions["d2"], SUCCEEDED, None, now=4.0)
    p.finish(p.executions["d3"], FAILED, "rolled back", now=4.0)
    assert p.executions["d2"].status == SUCCEEDED and not p.done(4.0)  # no retry while aborting; rollbacks pending
    assert p.step(4.0) == [(ROLLBACK, p.executions["d2"])]
    assert not p.done(5.0)  # the rollbacks' answers are awaited up to the timeout
    assert p.done(4.0 + p.timeout) and p.status == "ABORTED"


def test_a_canary_that_does_not_succeed_aborts_before_any_wave():
    p = _policy(3, canary=1, base_rate_per_minute=600)
    assert _started(p.step(0.0)) == ["d0"]
    p.finish(p.executions["d0"], FAILED, "rolled back: health check failed", now=1.0)
    assert p.step(1.0) == [] and p.status == "ABORTING" and "canary device d0 ended FAILED" in p.reason
    assert [p.executions[d].status for d in ("d1", "d2")] == [CANCELED, CANCELED] and p.wave == 0
    assert p.done(1.0) and p.status == "ABORTED"
    assert all(e.status != QUEUED for e in p.executions.values())
