"""Writes a state-machine decision to the database: the task row, its history, its outbox."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Table, bindparam, insert, update
from sqlalchemy.ext.asyncio import AsyncSession

from schemas.api import TaskState

from .db.models import Outbox, Task, TaskTransition
from .statemachine import Snapshot, Transition


class _TaskLike(Protocol):
    state: str
    attempt: int
    max_attempts: int
    retry_backoff: float
    agent_id: str | None
    cancel_requested: bool


def snapshot(task: _TaskLike) -> Snapshot:
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
) -> None:
    """Apply ``transition`` to ``task`` inside the caller's transaction.

    A retry bumps the attempt and adds an outbox row due after the backoff, so the relay
    publishes the next attempt only once this transaction commits.
    """
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


# -- the events consumer's path: plain rows and bulk statements, no ORM unit of work ----------

_tasks: Table = Task.__table__  # type: ignore[assignment]
_history: Table = TaskTransition.__table__  # type: ignore[assignment]
_outbox: Table = Outbox.__table__  # type: ignore[assignment]

ROW_COLUMNS = (
    _tasks.c.id,
    _tasks.c.pool,
    _tasks.c.state,
    _tasks.c.attempt,
    _tasks.c.max_attempts,
    _tasks.c.retry_backoff,
    _tasks.c.agent_id,
    _tasks.c.cancel_requested,
    _tasks.c.trace_parent,
    _tasks.c.created_at,
    _tasks.c.started_at,
)
"""What deciding and recording an event reads of a task (not its arguments or results)."""


@dataclass(slots=True)
class TaskRow:
    """A task as the events consumer sees it: mutated like the ORM object would be, its
    changes kept to be written in bulk, fenced by the attempt it had when it was read."""

    id: str
    pool: str
    state: str
    attempt: int
    max_attempts: int
    retry_backoff: float
    agent_id: str | None
    cancel_requested: bool
    trace_parent: str | None
    created_at: float
    started_at: float | None
    read_attempt: int = 0
    changes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> TaskRow:
        task = cls(*row)
        task.read_attempt = task.attempt
        return task


class Changes:
    """Transitions decided in one transaction, written by a few bulk statements in ``flush``."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.outbox: list[dict[str, Any]] = []
        self.dirty: dict[str, TaskRow] = {}

    def apply(
        self,
        task: TaskRow,
        transition: Transition,
        now: float,
        *,
        result_json: str | None = None,
        error_json: str | None = None,
    ) -> None:
        """Exactly what :func:`apply` does to an ORM task, on a :class:`TaskRow`."""
        self.history.append(
            {
                "task_id": task.id,
                "attempt": task.attempt,
                "at": now,
                "from_state": task.state,
                "to_state": transition.to.value,
                "agent_id": transition.agent_id,
                "reason": transition.reason,
            }
        )
        changes = task.changes
        task.state = changes["state"] = transition.to.value
        if transition.to is TaskState.RUNNING:
            task.agent_id = changes["agent_id"] = transition.agent_id
            task.started_at = changes["started_at"] = now
        elif transition.retry_in is not None:
            task.attempt = changes["attempt"] = task.attempt + 1
            task.agent_id = changes["agent_id"] = None
            changes["error_json"] = error_json
            self.outbox.append(
                {
                    "task_id": task.id,
                    "attempt": task.attempt,
                    "available_at": now + transition.retry_in,
                }
            )
        elif transition.to.terminal:
            changes["finished_at"] = now
            if result_json is not None:
                changes["result_json"] = result_json
            if error_json is not None:
                changes["error_json"] = error_json
        self.dirty[task.id] = task

    async def flush(self, session: AsyncSession) -> None:
        """One ``UPDATE ... WHERE id = ? AND attempt = ?`` executemany per set of changed
        columns, one insert of history rows, one of outbox rows."""
        connection = await session.connection()
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for task in self.dirty.values():
            columns = tuple(sorted(task.changes))
            params = {f"new_{c}": task.changes[c] for c in columns}
            params["key_id"] = task.id
            params["key_attempt"] = task.read_attempt
            groups.setdefault(columns, []).append(params)
        for columns, rows in groups.items():
            statement = (
                update(_tasks)
                .where(_tasks.c.id == bindparam("key_id"))
                .where(_tasks.c.attempt == bindparam("key_attempt"))
                .values({c: bindparam(f"new_{c}") for c in columns})
            )
            result = await connection.execute(statement, rows)
            if result.rowcount not in (-1, len(rows)):
                # Cannot happen under the row locks (PostgreSQL) or SQLite's single writer;
                # raising rolls everything back and the events are redelivered.
                raise RuntimeError(
                    f"{len(rows) - result.rowcount} task rows changed attempt while their "
                    "events were applied; the batch is rolled back and replayed"
                )
        if self.history:
            await connection.execute(insert(_history), self.history)
        if self.outbox:
            await connection.execute(insert(_outbox), self.outbox)
