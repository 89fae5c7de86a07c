"""A pool's ``max_running``: how many more of its attempts the relay may send now.

Busy means running, or sent to the broker and not started yet (queued with no outbox row for
its current attempt). At the limit the pool's next attempts stay in the outbox, queued, until
a slot frees (like Airflow's pool slots). Counted by the relay of each replica from the
database, so the limit holds across replicas up to the attempts two relays send at the same
moment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from rexec.schemas.api import TaskState

from .db.models import Outbox, Pool, Task

HELD_POLL = 0.2
"""Seconds between looks while a pool waits at its limit (a finished task frees a slot)."""


class Pooled(Protocol):
    @property
    def pool(self) -> str: ...


Row = TypeVar("Row", bound=Pooled)


async def free_slots(session: AsyncSession) -> dict[str, int]:
    """Free slots of the limited pools with attempts waiting in the outbox (zero or less: full).

    A limited pool with nothing waiting is left out: its limit does not matter this round.
    """
    limited: dict[str, int] = {
        name: limit
        for name, limit in await session.execute(
            select(Pool.name, Pool.max_running).where(Pool.max_running.is_not(None))
        )
        if limit is not None
    }
    if not limited:
        return {}
    busy: dict[str, int] = {}
    for pool, count in await session.execute(
        select(Task.pool, func.count())
        .where(
            Task.pool.in_(limited),
            Task.state.in_([TaskState.RUNNING.value, TaskState.QUEUED.value]),
        )
        .group_by(Task.pool)
    ):
        busy[pool] = count
    # Queued tasks whose current attempt is still in the outbox were not sent: not busy.
    waiting: dict[str, int] = {}
    for pool, count in await session.execute(
        select(Task.pool, func.count())
        .select_from(Outbox)
        .join(Task, Task.id == Outbox.task_id)
        .where(
            Task.pool.in_(limited),
            Task.state == TaskState.QUEUED.value,
            Task.attempt == Outbox.attempt,
        )
        .group_by(Task.pool)
    ):
        busy[pool] = busy.get(pool, 0) - count
        waiting[pool] = count
    return {pool: limited[pool] - busy.get(pool, 0) for pool, n in waiting.items() if n}


def within(rows: Sequence[Row], slots: dict[str, int]) -> tuple[list[Row], bool]:
    """The rows the relay may send now, and whether any were held back by a limit."""
    left = dict(slots)
    kept: list[Row] = []
    held = False
    for row in rows:
        pool = row.pool
        if pool in left:
            if left[pool] <= 0:
                held = True
                continue
            left[pool] -= 1
        kept.append(row)
    return kept, held
