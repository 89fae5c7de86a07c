"""Writes a state-machine decision to the database: the task row, its history, its outbox.

``plan`` decides the rows once; ``apply`` writes them through the ORM (cancel),
``apply_if_unchanged`` only if the row did not change since it was read (the watchdog),
``BatchWriter`` through a few Core executemany statements (the events consumer's hot path,
where the unit of work and identity map cost more than the SQL itself).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from sqlalchemy import CursorResult, Table, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from rexec.schemas import messages
from rexec.schemas.api import TaskState

from .db.models import Base, Outbox, Task, TaskLog, TaskTransition
from .statemachine import Snapshot, Transition

Values = dict[str, Any]


class Fenced(Protocol):
    """What the state machine reads of a task (an ORM ``Task`` or a ``TaskRow``)."""

    @property
    def id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def retry_backoff(self) -> float: ...
    @property
    def agent_id(self) -> str | None: ...
    @property
    def cancel_requested(self) -> bool: ...
    @property
    def fence(self) -> int: ...


def snapshot(task: Fenced) -> Snapshot:
    return Snapshot(
        state=TaskState(task.state),
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        retry_backoff=task.retry_backoff,
        agent_id=task.agent_id,
        cancel_requested=task.cancel_requested,
        fence=task.fence,
    )


@dataclass(frozen=True, slots=True)
class Writes:
    """The rows one transition writes: new values of the task's columns, and rows to add."""

    task: Values
    transition: Values
    log: Values | None = None
    outbox: Values | None = None


def plan(
    task: Fenced,
    transition: Transition,
    now: float,
    *,
    result_json: str | None = None,
    error_json: str | None = None,
    event: messages.TaskEvent | None = None,
) -> Writes:
    """What applying ``transition`` to ``task`` writes.

    A retry bumps the attempt and adds an outbox row due after the backoff, so the relay
    publishes the next attempt only once this transaction commits; an attempt handed back
    unstarted gets an outbox row for itself. The ``event`` that caused
    the transition, when it ended an attempt that ran, leaves that attempt's log location and
    tail (the log itself stays on the agent).
    """
    values: Values = {"state": transition.to.value}
    log = outbox = None
    if isinstance(event, messages.LOGGED_EVENTS) and event.log_ref:
        log = {
            "task_id": task.id,
            "attempt": event.attempt,
            "agent_id": event.agent_id,
            "log_ref": event.log_ref,
            "log_tail": event.log_tail,
            "at": now,
        }
        values.update(log_ref=event.log_ref, log_tail=event.log_tail)
    history = {
        "task_id": task.id,
        "attempt": task.attempt,
        "at": now,
        "from_state": task.state,
        "to_state": transition.to.value,
        "agent_id": transition.agent_id,
        "reason": transition.reason,
    }
    if transition.to is TaskState.RUNNING:
        values.update(agent_id=transition.agent_id, started_at=now, fence=transition.fence)
    elif transition.retry_in is not None:
        attempt = task.attempt if transition.same_attempt else task.attempt + 1
        if not transition.same_attempt:
            values.update(attempt=attempt, agent_id=None, error_json=error_json)
        if transition.unspent:
            values["max_attempts"] = task.max_attempts + 1
        outbox = {"task_id": task.id, "attempt": attempt, "available_at": now + transition.retry_in}
    elif transition.to.terminal:
        values["finished_at"] = now
        if result_json is not None:
            values["result_json"] = result_json
        if error_json is not None:
            values["error_json"] = error_json
    return Writes(values, history, log, outbox)


def assign(target: object, values: Values) -> None:
    for name, value in values.items():
        setattr(target, name, value)


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
    """Apply ``transition`` to the ORM ``task`` inside the caller's transaction (see ``plan``)."""
    writes = plan(
        task, transition, now, result_json=result_json, error_json=error_json, event=event
    )
    assign(task, writes.task)
    session.add(TaskTransition(**writes.transition))
    if writes.log is not None:
        session.add(TaskLog(**writes.log))
    if writes.outbox is not None:
        session.add(Outbox(**writes.outbox))


async def apply_if_unchanged(
    session: AsyncSession,
    task: Fenced,
    transition: Transition,
    now: float,
    *,
    error_json: str | None = None,
) -> bool:
    """Apply ``transition`` only if the row still holds what it was decided on; say whether.

    For writers that read without a lock (the watchdog): one UPDATE guarded on the columns
    the state machine read that can change, its row count telling whether another writer (an event applied
    by any replica) committed first; then nothing else is written. Portable: SQLite has one
    writer at a time, and PostgreSQL's READ COMMITTED re-checks an UPDATE's WHERE against the
    row a concurrent writer committed while the UPDATE waited for it.
    """
    writes = plan(task, transition, now, error_json=error_json)
    agent = _TASKS.c.agent_id
    updated: CursorResult[Any] = cast(
        CursorResult[Any],
        await session.execute(
            update(_TASKS)
            .where(
                _TASKS.c.id == task.id,
                _TASKS.c.state == task.state,
                _TASKS.c.attempt == task.attempt,
                agent.is_(None) if task.agent_id is None else agent == task.agent_id,
                _TASKS.c.cancel_requested == task.cancel_requested,
            )
            .values(writes.task)
        ),
    )
    if updated.rowcount != 1:
        return False
    for model, row in (
        (TaskTransition, writes.transition),
        (TaskLog, writes.log),
        (Outbox, writes.outbox),
    ):
        if row is not None:
            await session.execute(insert(_table(model)), [row])
    return True


@dataclass(slots=True)
class TaskRow:
    """The columns of a task the events consumer reads, updated in memory as events apply
    (a later event of the same batch sees the earlier one's effect, as with ORM objects)."""

    id: str
    pool: str
    state: str
    attempt: int
    max_attempts: int
    retry_backoff: float
    agent_id: str | None
    cancel_requested: bool
    created_at: float
    started_at: float | None
    trace_parent: str | None
    fence: int
    # Not read from the database, nor read afterwards: they only take what a transition writes.
    finished_at: float | None = None
    result_json: str | None = None
    error_json: str | None = None
    log_ref: str | None = None
    log_tail: str | None = None


_ROW_COLUMNS = (
    Task.id,
    Task.pool,
    Task.state,
    Task.attempt,
    Task.max_attempts,
    Task.retry_backoff,
    Task.agent_id,
    Task.cancel_requested,
    Task.created_at,
    Task.started_at,
    Task.trace_parent,
    Task.fence,
)


LOCK_CHUNK = 1000
"""Ids per ``IN (...)`` of ``lock_rows``. A batch of events after an outage can name tens of
thousands of tasks (1,000 messages of up to 500 events), past the 32,767 parameters asyncpg
and SQLite take in one statement: that batch would fail again at each redelivery."""


async def lock_rows(session: AsyncSession, task_ids: set[str]) -> dict[str, TaskRow]:
    """The tasks' rows by id, locked for the transaction (``FOR UPDATE`` where supported),
    in chunks taken in id order (so concurrent lockers meet them in the same order)."""
    ordered = sorted(task_ids)
    rows: dict[str, TaskRow] = {}
    for start in range(0, len(ordered), LOCK_CHUNK):
        chunk = ordered[start : start + LOCK_CHUNK]
        result = await session.execute(
            select(*_ROW_COLUMNS).where(Task.id.in_(chunk)).with_for_update()
        )
        rows.update((row.id, TaskRow(**row._asdict())) for row in result)
    return rows


def _table(model: type[Base]) -> Table:
    """The Core table of a model: Core statements skip the ORM's per-row bookkeeping."""
    return Base.metadata.tables[model.__tablename__]


_TASKS = _table(Task)
_ID = "task_id_"  # the WHERE parameter; a column's own name would be taken for its SET value


@dataclass
class BatchWriter:
    """Collects the writes of many transitions, then writes them in a few statements."""

    updates: dict[str, Values] = field(default_factory=dict)
    transitions: list[Values] = field(default_factory=list)
    logs: list[Values] = field(default_factory=list)
    outbox: list[Values] = field(default_factory=list)

    def add(self, row: TaskRow, writes: Writes) -> None:
        assign(row, writes.task)
        self.updates.setdefault(row.id, {}).update(writes.task)
        self.transitions.append(writes.transition)
        if writes.log is not None:
            self.logs.append(writes.log)
        if writes.outbox is not None:
            self.outbox.append(writes.outbox)

    async def flush(self, session: AsyncSession) -> None:
        """One UPDATE executemany per set of changed columns, one INSERT per table."""
        shapes: dict[frozenset[str], list[Values]] = defaultdict(list)
        for task_id, values in self.updates.items():
            shapes[frozenset(values)].append({**values, _ID: task_id})
        for params in shapes.values():
            await session.execute(update(_TASKS).where(_TASKS.c.id == bindparam(_ID)), params)
        for model, rows in (
            (TaskTransition, self.transitions),
            (TaskLog, self.logs),
            (Outbox, self.outbox),
        ):
            if rows:
                await session.execute(insert(_table(model)), rows)
