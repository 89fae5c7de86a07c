"""The change feed of task states: ``GET /v1/tasks/changes``.

A scheduler tracking many tasks (the Airflow executor) reads the transitions applied after
its cursor instead of polling every running task. The feed is ``task_transitions`` in the
order of its ids (``seq``); a submission is no transition (the submitter knows its tasks), so
the first change of a task is usually its start.

Ids are handed out when a transition is inserted but become visible when its transaction
commits. With PostgreSQL, where several transactions write at once (the events consumer, the
watchdog, cancels, other replicas), a transition may commit after one with a higher id was
read: a reader whose cursor passed it never sees it in the feed. A reader should therefore
also reconcile now and then: ``POST /v1/tasks/wait`` with ``wait=0`` over the ids it tracks
returns their current states. SQLite has one writer at a time, so ids commit in order there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
from sqlalchemy import func, select

from rexec.schemas.api import MAX_CHANGES, TaskChange, TaskChanges, TaskState

from . import service
from .db.models import Task, TaskTransition
from .runtime import Runtime

DEFAULT_LIMIT = 500
"""Changes one read returns unless it asks for fewer (at most ``MAX_CHANGES``)."""


async def changes(
    rt: Runtime,
    *,
    after: int | None,
    pools: Sequence[str] = (),
    wait: float = 0.0,
    limit: int = DEFAULT_LIMIT,
) -> TaskChanges:
    """Transitions with ``seq > after``, oldest first, at most ``limit``, of ``pools`` (all
    when empty). With ``wait``, long-poll until at least one exists or the wait (at most 60 s)
    ran out. Without ``after``: no changes, and the cursor a new reader starts from."""
    if not 1 <= limit <= MAX_CHANGES:
        raise service.Invalid(f"limit must be between 1 and {MAX_CHANGES}, got {limit}")
    if after is not None and after < 0:
        raise service.Invalid(f"after must be a sequence number of 0 or more, got {after}")
    async with rt.sessions() as session:
        await service._check_pools(rt, session, pools)
        if after is None:
            top = await session.scalar(select(func.max(TaskTransition.id)))
            return TaskChanges(cursor=int(top or 0), changes=[])
    query = (
        select(TaskTransition, Task.idempotency_key)
        .join(Task, Task.id == TaskTransition.task_id)
        .where(TaskTransition.id > after)
        .order_by(TaskTransition.id)
        .limit(limit)
    )
    if pools:
        query = query.where(Task.pool.in_(sorted(set(pools))))
    deadline = time.monotonic() + min(max(wait, 0.0), service.MAX_WAIT)
    while True:
        # Take the event before reading, so a commit between the read and the wait wakes us;
        # the periodic recheck covers writers that do not set it (the watchdog, other replicas).
        applied = rt.events_applied
        async with rt.sessions() as session:
            rows = (await session.execute(query)).all()
        remaining = deadline - time.monotonic()
        if rows or remaining <= 0:
            break
        with anyio.move_on_after(min(remaining, service.WAIT_RECHECK)):
            await applied.wait()
    found = [
        TaskChange(
            seq=row.id,
            task_id=row.task_id,
            attempt=row.attempt,
            state=TaskState(row.to_state),
            at=row.at,
            agent_id=row.agent_id,
            reason=row.reason,
            idempotency_key=key,
        )
        for row, key in rows
    ]
    return TaskChanges(cursor=found[-1].seq if found else after, changes=found)
