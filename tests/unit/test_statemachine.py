"""The state machine alone: every transition and every fencing rule, without services."""

from __future__ import annotations

import random

import pytest

from rexec.dispatcher.statemachine import (
    HELD_RECHECK,
    MarkCancelRequested,
    Reject,
    Snapshot,
    Transition,
    on_agent_lost,
    on_cancel,
    on_event,
    on_expiry,
)
from rexec.schemas.api import TaskState
from rexec.schemas.messages import (
    HELD_ELSEWHERE,
    Cancelled,
    Expired,
    Failed,
    Returned,
    Started,
    Succeeded,
    TimedOut,
)

Q, R = TaskState.QUEUED, TaskState.RUNNING


def snap(
    state: TaskState = Q, attempt: int = 1, agent: str | None = None, **kw: object
) -> Snapshot:
    fields: dict[str, object] = {"max_attempts": 3, "retry_backoff": 1.0, "cancel_requested": False}
    fields.update(kw)
    return Snapshot(state=state, attempt=attempt, agent_id=agent, **fields)  # type: ignore[arg-type]


def started(attempt: int = 1, agent: str = "a1") -> Started:
    return Started(task_id="t", attempt=attempt, agent_id=agent, at=1.0)


def failed(attempt: int = 1, agent: str = "a1", retryable: bool = True) -> Failed:
    return Failed(
        task_id="t",
        attempt=attempt,
        agent_id=agent,
        at=2.0,
        error_type="E",
        message="m",
        retryable=retryable,
    )


def test_started_moves_queued_to_running_under_that_agent() -> None:
    assert on_event(snap(), started()) == Transition(R, "started", "a1")


def test_duplicate_started_from_same_agent_is_rejected() -> None:
    assert on_event(snap(R, agent="a1"), started()) == Reject("duplicate")


def test_started_by_an_agent_that_took_over_the_lease_moves_the_task() -> None:
    assert on_event(snap(R, agent="dead"), started(agent="a2")) == Transition(R, "started", "a2")


@pytest.mark.parametrize("event", [started(attempt=1), failed(attempt=1)])
def test_events_of_an_older_attempt_are_stale(event: Started | Failed) -> None:
    decision = on_event(snap(R, attempt=2, agent="a2"), event)
    assert isinstance(decision, Reject) and decision.reason == "stale_attempt"


def test_a_stale_start_asks_the_agent_to_stop_the_attempt() -> None:
    decision = on_event(snap(R, attempt=2, agent="a2"), started(attempt=1))
    assert decision == Reject("stale_attempt", stop_attempt=True)


def test_a_start_records_the_fence_of_its_claim() -> None:
    start = Started(task_id="t", attempt=1, agent_id="a1", at=1.0, fence=100)
    assert on_event(snap(), start) == Transition(R, "started", "a1", fence=100)


def test_a_late_start_of_an_older_claim_is_refused_and_stopped() -> None:
    """Agent a1 claimed (fence 100) and stalled before its ``started`` left; a2 took the lease
    over (fence 200) and started. a1's ``started`` arrives now: it must not take the task back."""
    late = Started(task_id="t", attempt=1, agent_id="a1", at=1.0, fence=100)
    task = snap(R, agent="a2", fence=200)
    assert on_event(task, late) == Reject("stale_claim", stop_attempt=True)
    result = Succeeded(task_id="t", attempt=1, agent_id="a1", at=3.0, result=1, fence=100)
    assert on_event(task, result) == Reject("stale_claim")
    mine = Succeeded(task_id="t", attempt=1, agent_id="a2", at=3.0, result=1, fence=200)
    assert on_event(task, mine) == Transition(TaskState.SUCCEEDED, "succeeded", "a2")


def test_a_takeover_by_a_later_claim_moves_the_task() -> None:
    takeover = Started(task_id="t", attempt=1, agent_id="a2", at=1.0, fence=200)
    decision = on_event(snap(R, agent="a1", fence=100), takeover)
    assert decision == Transition(R, "started", "a2", fence=200)


def test_an_unknown_fence_is_fenced_by_agent_alone() -> None:
    """Agents from before fencing (and a claim whose reply was lost) send none."""
    assert on_event(snap(R, agent="a1", fence=100), started(agent="a2")) == Transition(
        R, "started", "a2"
    )


def test_result_from_an_agent_that_no_longer_holds_the_attempt_is_rejected() -> None:
    result = Succeeded(task_id="t", attempt=1, agent_id="old", at=3.0, result=1)
    assert on_event(snap(R, agent="new"), result) == Reject("stale_agent")


@pytest.mark.parametrize("state", [TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED])
def test_nothing_changes_a_terminal_task(state: TaskState) -> None:
    result = Succeeded(task_id="t", attempt=1, agent_id="a1", at=3.0, result=1)
    assert on_event(snap(state, agent="a1"), result) == Reject("already_terminal")


def test_success_is_terminal() -> None:
    result = Succeeded(task_id="t", attempt=1, agent_id="a1", at=3.0, result=1)
    assert on_event(snap(R, agent="a1"), result) == Transition(
        TaskState.SUCCEEDED, "succeeded", "a1"
    )


def test_retryable_failure_requeues_with_backoff_while_attempts_remain() -> None:
    decision = on_event(snap(R, agent="a1"), failed(), random.Random(1))
    assert isinstance(decision, Transition) and decision.to is Q
    assert decision.retry_in is not None and 0.5 <= decision.retry_in <= 1.0


def test_an_attempt_handed_back_at_shutdown_runs_again_without_spending_an_attempt() -> None:
    def shutdown_of(attempt: int) -> Failed:
        return Failed(
            task_id="t",
            attempt=attempt,
            agent_id="a1",
            at=2.0,
            error_type="AgentShutdown",
            message="drained",
            retryable=True,
        )

    shutdown = shutdown_of(1)
    decision = on_event(snap(R, agent="a1", max_attempts=1), shutdown)
    assert decision == Transition(Q, "AgentShutdown", "a1", retry_in=0.0, unspent=True)
    cancelling = on_event(snap(R, agent="a1", cancel_requested=True), shutdown)
    assert cancelling == Transition(TaskState.CANCELLED, "AgentShutdown", "a1")
    last = snap(R, attempt=100, agent="a1", max_attempts=100)
    assert on_event(last, shutdown_of(100)) == Transition(TaskState.FAILED, "AgentShutdown", "a1")


def test_failure_on_the_last_attempt_is_final() -> None:
    decision = on_event(snap(R, attempt=3, agent="a1"), failed(attempt=3))
    assert decision == Transition(TaskState.FAILED, "E", "a1")


def test_non_retryable_failure_is_final_at_once() -> None:
    decision = on_event(snap(R, agent="a1"), failed(retryable=False))
    assert decision == Transition(TaskState.FAILED, "E", "a1")


def test_timeout_retries_then_ends_timed_out() -> None:
    timeout = TimedOut(task_id="t", attempt=3, agent_id="a1", at=2.0, timeout=5)
    assert on_event(snap(R, attempt=3, agent="a1"), timeout).to is TaskState.TIMED_OUT  # type: ignore[union-attr]
    early = TimedOut(task_id="t", attempt=1, agent_id="a1", at=2.0, timeout=5)
    assert on_event(snap(R, agent="a1"), early).to is Q  # type: ignore[union-attr]


def test_failure_of_a_task_being_cancelled_ends_cancelled_not_retried() -> None:
    decision = on_event(snap(R, agent="a1", cancel_requested=True), failed())
    assert decision == Transition(TaskState.CANCELLED, "E", "a1")


def test_cancelled_and_expired_events_are_terminal() -> None:
    cancelled = Cancelled(task_id="t", attempt=1, agent_id="a1", at=2.0)
    assert on_event(snap(R, agent="a1"), cancelled).to is TaskState.CANCELLED  # type: ignore[union-attr]
    expired = Expired(task_id="t", attempt=1, agent_id="a1", at=2.0)
    assert on_event(snap(), expired).to is TaskState.EXPIRED  # type: ignore[union-attr]


def test_cancel_of_queued_task_is_immediate_and_of_running_task_asks_the_agent() -> None:
    assert on_cancel(snap()) == Transition(TaskState.CANCELLED, "cancel_requested", None)
    assert on_cancel(snap(R, agent="a1")) == MarkCancelRequested("a1")
    assert on_cancel(snap(TaskState.SUCCEEDED)) == Reject("already_terminal")


def test_lost_agent_requeues_at_once_then_fails_with_agent_lost() -> None:
    assert on_agent_lost(snap(R, agent="a1"), "a1") == Transition(
        Q, "agent_lost", "a1", retry_in=0.0
    )
    assert on_agent_lost(snap(R, attempt=3, agent="a1"), "a1") == Transition(
        TaskState.FAILED, "agent_lost", "a1"
    )
    assert on_agent_lost(snap(R, agent="a2"), "a1") == Reject("not_running_there")


def test_expiry_applies_only_to_queued_tasks() -> None:
    assert on_expiry(snap()) == Transition(TaskState.EXPIRED, "expired", None)
    assert on_expiry(snap(R, agent="a1")) == Reject("not_queued")


def returned(attempt: int = 1, agent: str = "a1") -> Returned:
    return Returned(task_id="t", attempt=attempt, agent_id=agent, at=2.0, reason="no_slot")


def test_a_returned_attempt_is_published_again_as_the_same_attempt() -> None:
    assert on_event(snap(), returned()) == Transition(
        Q, "returned: no_slot", None, retry_in=0.0, same_attempt=True
    )


@pytest.mark.parametrize(
    ("task", "reason"),
    [
        (snap(R, agent="a2"), "not_queued"),  # another agent started it (took it over)
        (snap(attempt=2), "stale_attempt"),
        (snap(TaskState.CANCELLED), "already_terminal"),
    ],
)
def test_a_return_of_an_attempt_that_moved_on_is_rejected(task: Snapshot, reason: str) -> None:
    assert on_event(task, returned()) == Reject(reason)


def test_an_attempt_held_by_another_live_agent_is_looked_at_again_after_a_pause() -> None:
    held = Returned(task_id="t", attempt=1, agent_id="a2", at=2.0, reason=HELD_ELSEWHERE)
    assert on_event(snap(), held) == Transition(
        Q, "returned: held_elsewhere", None, retry_in=HELD_RECHECK, same_attempt=True
    )
    assert on_event(snap(R, agent="a1"), held) == Reject("not_queued"), "it started: done"
