"""What a dead-lettered task message does to its task, decided without services."""

from __future__ import annotations

import random

import pytest

from rexec.dispatcher.deadletters import cause
from rexec.dispatcher.statemachine import (
    DeadLetter,
    Reject,
    Snapshot,
    Transition,
    on_dead_letter,
)
from rexec.schemas import names
from rexec.schemas.api import TaskState

Q = TaskState.QUEUED
LIMIT = "dead_lettered: delivery limit reached (x-death: ...)"


def snap(state: TaskState = Q, attempt: int = 1, max_attempts: int = 3) -> Snapshot:
    return Snapshot(
        state=state, attempt=attempt, max_attempts=max_attempts, retry_backoff=1.0, agent_id=None
    )


def test_the_delivery_limit_starts_the_next_attempt_after_the_backoff() -> None:
    decision = on_dead_letter(snap(), DeadLetter(1, LIMIT, retryable=True), random.Random(1))
    assert isinstance(decision, Transition)
    assert (decision.to, decision.reason, decision.same_attempt) == (Q, LIMIT, False)
    assert decision.retry_in is not None and 0.5 <= decision.retry_in <= 1.0


def test_the_delivery_limit_fails_the_task_once_attempts_are_spent() -> None:
    decision = on_dead_letter(snap(attempt=3), DeadLetter(3, LIMIT, retryable=True))
    assert decision == Transition(TaskState.FAILED, LIMIT, None)


def test_an_agent_refusal_fails_the_task_whatever_attempts_remain() -> None:
    reason = "dead_lettered by agent a1: refused: bad signature"
    decision = on_dead_letter(snap(), DeadLetter(1, reason))
    assert decision == Transition(TaskState.FAILED, reason, None)


def test_an_unsigned_dead_letter_only_publishes_the_same_attempt_again() -> None:
    for retryable in (False, True):
        dead = DeadLetter(1, "r", retryable=retryable, signed=False)
        decision = on_dead_letter(snap(attempt=1, max_attempts=1), dead)
        assert decision == Transition(Q, "r", None, retry_in=0.0, same_attempt=True)


@pytest.mark.parametrize(
    ("task", "reason"),
    [
        (snap(attempt=2), "stale_attempt"),
        (snap(TaskState.RUNNING), "not_queued"),
        (snap(TaskState.SUCCEEDED), "not_queued"),
        (snap(TaskState.CANCELLED), "not_queued"),
    ],
)
def test_a_task_that_moved_on_is_left_alone(task: Snapshot, reason: str) -> None:
    assert on_dead_letter(task, DeadLetter(1, LIMIT, retryable=True)) == Reject(reason)


def test_the_cause_is_read_from_the_agent_reason_or_the_broker_record() -> None:
    agent = {names.REASON_HEADER: b"pool mismatch", names.DEAD_LETTER_AGENT_HEADER: "a1"}
    assert cause(agent) == (False, "dead_lettered by agent a1: pool mismatch")
    death = {"x-death": [{"reason": "delivery_limit", "queue": "rexec.pool.p", "count": 1}]}
    assert cause(death) == (
        True,
        "dead_lettered: delivery limit reached "
        "(x-death: reason=delivery_limit, queue=rexec.pool.p, count=1)",
    )
    rejected = {"x-death": [{"reason": "rejected", "queue": "rexec.pool.p", "count": 2}]}
    assert cause(rejected)[0] is False
    assert cause({})[1].startswith("dead_lettered: no x-death record")
