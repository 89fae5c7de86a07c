"""The task state machine: every state change is decided here, and nowhere else.

Pure functions over a snapshot of the task and one input (an agent's event or an operator's or
watchdog's command). Fencing lives here: an event for another attempt, from an agent that no
longer holds the attempt, or of a claim older than the one the task runs under (a ``started``
that arrives after another agent took the lease over), is rejected, never applied.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rexec.schemas.api import MAX_ATTEMPTS, TaskState
from rexec.schemas.messages import (
    AGENT_SHUTDOWN,
    HELD_ELSEWHERE,
    Cancelled,
    Expired,
    Failed,
    Returned,
    Started,
    Succeeded,
    TaskEvent,
    TimedOut,
)

from .backoff import retry_delay

HELD_RECHECK = 1.0
"""Seconds before an attempt returned as ``held_elsewhere`` is published again."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    state: TaskState
    attempt: int
    max_attempts: int
    retry_backoff: float
    agent_id: str | None
    cancel_requested: bool = False
    fence: int = 0
    """The fencing token of the claim the running attempt started under (0: none known)."""


@dataclass(frozen=True, slots=True)
class Transition:
    """Apply this: move to ``to``; when ``retry_in`` is set, start attempt ``attempt + 1``
    (``same_attempt``: publish the current attempt again, it never started)."""

    to: TaskState
    reason: str
    agent_id: str | None
    retry_in: float | None = None
    same_attempt: bool = False
    unspent: bool = False
    """For a retry: the attempt that ends is not counted against ``max_attempts``."""
    fence: int = 0
    """For ``running``: the fencing token of the claim it started under."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Do not apply. ``stop_attempt`` asks the sender to kill the attempt it still runs."""

    reason: str
    stop_attempt: bool = False


@dataclass(frozen=True, slots=True)
class MarkCancelRequested:
    """A running task: ask its agent to stop it; the agent's ``cancelled`` event finishes it."""

    agent_id: str | None


Decision = Transition | Reject


def on_event(task: Snapshot, event: TaskEvent, rng: random.Random | None = None) -> Decision:
    """Decide what an agent's event does to the task."""
    if event.attempt != task.attempt:
        return Reject("stale_attempt", stop_attempt=isinstance(event, Started))
    if task.state.terminal:
        return Reject("already_terminal", stop_attempt=isinstance(event, Started))
    if isinstance(event, Returned):
        if task.state is not TaskState.QUEUED:
            return Reject("not_queued")
        # Held by another live agent: it may start it any moment, or be dead with its
        # heartbeat not yet expired; look again after a pause, not in a tight loop.
        pause = HELD_RECHECK if event.reason == HELD_ELSEWHERE else 0.0
        return Transition(
            TaskState.QUEUED, f"returned: {event.reason}", None, retry_in=pause, same_attempt=True
        )
    if _older_claim(task, event):
        # Its agent stalled after claiming; another took the lease over and started since.
        return Reject("stale_claim", stop_attempt=isinstance(event, Started))
    if isinstance(event, Started):
        if task.state is TaskState.RUNNING and task.agent_id == event.agent_id:
            return Reject("duplicate")
        # QUEUED, or RUNNING under an agent whose lease this agent took over (it was dead).
        return Transition(TaskState.RUNNING, "started", event.agent_id, fence=event.fence)
    if task.state is TaskState.RUNNING and task.agent_id != event.agent_id:
        return Reject("stale_agent")
    if isinstance(event, Succeeded):
        return Transition(TaskState.SUCCEEDED, "succeeded", event.agent_id)
    if isinstance(event, Cancelled):
        return Transition(TaskState.CANCELLED, "cancelled", event.agent_id)
    if isinstance(event, Expired):
        return Transition(TaskState.EXPIRED, "expired", event.agent_id)
    if isinstance(event, Failed) and event.error_type == AGENT_SHUTDOWN:
        return _handed_back_at_shutdown(task, event.agent_id)
    if isinstance(event, Failed):
        return _failure(
            task, TaskState.FAILED, event.error_type, event.agent_id, event.retryable, rng
        )
    if isinstance(event, TimedOut):
        return _failure(task, TaskState.TIMED_OUT, "timeout", event.agent_id, True, rng)
    raise TypeError(f"not a task event: {event!r}")


def _older_claim(task: Snapshot, event: TaskEvent) -> bool:
    """The event comes from a claim older than the running attempt's (both known)."""
    return (
        task.state is TaskState.RUNNING
        and event.fence != 0
        and task.fence != 0
        and event.fence < task.fence
    )


def on_agent_lost(task: Snapshot, agent_id: str) -> Decision:
    """The watchdog found the agent running this attempt dead: requeue or give up."""
    if task.state is not TaskState.RUNNING or task.agent_id != agent_id:
        return Reject("not_running_there")
    if task.cancel_requested:
        return Transition(TaskState.CANCELLED, "agent_lost", agent_id)
    if task.attempt < task.max_attempts:
        return Transition(TaskState.QUEUED, "agent_lost", agent_id, retry_in=0.0)
    return Transition(TaskState.FAILED, "agent_lost", agent_id)


def on_overdue(task: Snapshot, rng: random.Random | None = None) -> Decision:
    """The attempt outlived its timeout and its agent said nothing: the watchdog's backstop."""
    if task.state is not TaskState.RUNNING:
        return Reject("not_running")
    return _failure(task, TaskState.TIMED_OUT, "timeout_backstop", task.agent_id, True, rng)


def on_cancel(task: Snapshot) -> Decision | MarkCancelRequested:
    """An operator asked to cancel the task."""
    if task.state.terminal:
        return Reject("already_terminal")
    if task.state is TaskState.QUEUED:
        return Transition(TaskState.CANCELLED, "cancel_requested", task.agent_id)
    return MarkCancelRequested(task.agent_id)


def on_expiry(task: Snapshot) -> Decision:
    """The task waited longer than its schedule-to-start limit."""
    if task.state is not TaskState.QUEUED:
        return Reject("not_queued")
    return Transition(TaskState.EXPIRED, "expired", None)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A task message of ``attempt`` that died in ``rexec.dead.<pool>``, and why.

    ``retryable``: the broker dead-lettered it at the pool queue's delivery limit (deliveries
    returned by crashes, cut-offs and broker restarts), so nothing says the task is at fault.
    ``signed``: the body verifies against this plane's keys; one that does not (a forgery, or
    a key retired since) must not end a task, only have its attempt published again, signed."""

    attempt: int
    reason: str
    retryable: bool = False
    signed: bool = True


def on_dead_letter(task: Snapshot, dead: DeadLetter, rng: random.Random | None = None) -> Decision:
    """A dead-lettered task message: only a task still ``queued`` at that attempt is waiting
    for it (any other has started or ended through another copy, or moved on).

    Unsigned: publish the same attempt again. Dead at the delivery limit: the next attempt
    after the backoff while attempts remain (a crash loop cannot strand a task, and a message
    that kills every agent that takes it still ends), else ``failed``. Refused by an agent
    (bad signature, wrong pool, malformed): ``failed``, since a copy would be refused alike."""
    if dead.attempt != task.attempt:
        return Reject("stale_attempt")
    if task.state is not TaskState.QUEUED:
        return Reject("not_queued")
    if not dead.signed:
        return Transition(TaskState.QUEUED, dead.reason, None, retry_in=0.0, same_attempt=True)
    if dead.retryable and task.attempt < task.max_attempts:
        delay = retry_delay(task.retry_backoff, task.attempt, rng)
        return Transition(TaskState.QUEUED, dead.reason, None, retry_in=delay)
    return Transition(TaskState.FAILED, dead.reason, None)


def _handed_back_at_shutdown(task: Snapshot, agent_id: str) -> Transition:
    """A draining agent stopped the attempt and gave it back (a rolling restart, a scale-in):
    not the task's doing, so it runs again without spending one of its attempts, or a task of
    ``max_attempts=1`` would fail at every deploy. Bounded by ``MAX_ATTEMPTS`` in all."""
    if task.cancel_requested:
        return Transition(TaskState.CANCELLED, AGENT_SHUTDOWN, agent_id)
    if task.attempt >= MAX_ATTEMPTS:
        return Transition(TaskState.FAILED, AGENT_SHUTDOWN, agent_id)
    return Transition(TaskState.QUEUED, AGENT_SHUTDOWN, agent_id, retry_in=0.0, unspent=True)


def _failure(
    task: Snapshot,
    final: TaskState,
    reason: str,
    agent_id: str | None,
    retryable: bool,
    rng: random.Random | None,
) -> Transition:
    if task.cancel_requested:
        return Transition(TaskState.CANCELLED, reason, agent_id)
    if retryable and task.attempt < task.max_attempts:
        delay = retry_delay(task.retry_backoff, task.attempt, rng)
        return Transition(TaskState.QUEUED, reason, agent_id, retry_in=delay)
    return Transition(final, reason, agent_id)
