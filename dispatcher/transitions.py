"""Writes a state-machine decision to the database: the task row, its history, its outbox."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from schemas import messages
from schemas.api import TaskState

from .db.models import Outbox, Task, TaskLog, TaskTransition
from .statemachine import Snapshot, Transition


def snapshot(task: Task) -> Snapshot:
    return Snapshot(
        state=TaskState(task.state),
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        retry_backoff=task.retry_backoff,
        agent_id=task.agent_id,
        cancel_requested=task.cancel_requested,
    )


def apply(
    session: AsyncSession,
    task: Task,
    transition: Transition,
    now: float,
    *,
    result_json: str | None = None,
    error_json: str | None = None,
    event: messages.TaskEvent | None = None,
) -> None:
    """Apply ``transition`` to ``task`` inside the caller's transaction.

    A retry bumps the attempt and adds an outbox row due after the backoff, so the relay
    publishes the next attempt only once this transaction commits. The ``event`` that caused
    the transition, when it ended an attempt that ran, leaves that attempt's log location and
    tail (the log itself stays on the agent).
    """
    if isinstance(event, messages.LOGGED_EVENTS) and event.log_ref:
        record_log(session, task, event, now)
    session.add(
        TaskTransition(
            task_id=task.id,
            attempt=task.attempt,
            at=now,
            from_state=task.state,
            to_state=transition.to.value,
            agent_id=transition.agent_id,
            reason=transition.reason,
        )
    )
    task.state = transition.to.value
    if transition.to is TaskState.RUNNING:
        task.agent_id = transition.agent_id
        task.started_at = now
    elif transition.retry_in is not None:
        task.attempt += 1
        task.agent_id = None
        task.error_json = error_json
        session.add(
            Outbox(task_id=task.id, attempt=task.attempt, available_at=now + transition.retry_in)
        )
    elif transition.to.terminal:
        task.finished_at = now
        if result_json is not None:
            task.result_json = result_json
        if error_json is not None:
            task.error_json = error_json


def record_log(
    session: AsyncSession,
    task: Task,
    event: messages.Succeeded | messages.Failed | messages.TimedOut | messages.Cancelled,
    now: float,
) -> None:
    session.add(
        TaskLog(
            task_id=task.id,
            attempt=event.attempt,
            agent_id=event.agent_id,
            log_ref=event.log_ref,
            log_tail=event.log_tail,
            at=now,
        )
    )
    task.log_ref = event.log_ref
    task.log_tail = event.log_tail
