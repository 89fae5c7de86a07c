"""Statements on the hot paths stay within the database's parameter limit, however long the
backlog: asyncpg (and SQLite) take at most 32,767 parameters in one statement, and a batch that
fails on it fails again at each retry, so the loop would make no progress at all."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import func, insert, select

from rexec.dispatcher import transitions
from rexec.dispatcher.db.models import Outbox, Pool, Task
from rexec.dispatcher.runtime import Runtime
from rexec.schemas.api import TaskState
from tests.dispatcher.test_watchdog import leading_watchdog

pytestmark = pytest.mark.anyio

BACKLOG = 33_000
"""More tasks than one statement may name."""


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """PostgreSQL only: SQLite here takes 250,000 parameters, so it never met the limit."""
    return postgres_url


async def backlog(rt: Runtime, pool: str, expires_at: float | None = None) -> list[str]:
    """``BACKLOG`` queued tasks in a new pool, each with its outbox row, written in bulk."""
    now = time.time()
    ids = [uuid.uuid4().hex for _ in range(BACKLOG)]
    rows = [
        {
            "id": task_id,
            "pool": pool,
            "kind": "function",
            "target": "tests.tasks:add",
            "args_json": "[]",
            "kwargs_json": "{}",
            "argv_json": "[]",
            "state": TaskState.QUEUED.value,
            "attempt": 1,
            "max_attempts": 1,
            "retry_backoff": 0.0,
            "created_at": now,
            "cancel_requested": False,
            "expires_at": expires_at,
        }
        for task_id in ids
    ]
    async with rt.sessions.begin() as session:
        session.add(Pool(name=pool, description="", draining=True, created_at=now))
        await session.flush()
        for start in range(0, BACKLOG, 5000):
            await session.execute(insert(Task), rows[start : start + 5000])
        outbox = [{"task_id": t, "attempt": 1, "available_at": now} for t in ids]
        for start in range(0, BACKLOG, 5000):
            await session.execute(insert(Outbox), outbox[start : start + 5000])
    return ids


async def count(rt: Runtime, pool: str, state: TaskState) -> int:
    async with rt.sessions() as session:
        found = await session.scalar(
            select(func.count()).select_from(Task).where(Task.pool == pool, Task.state == state)
        )
    return int(found or 0)


async def test_a_backlog_that_expires_at_once_expires_over_a_few_ticks(
    rt: Runtime, pool_name: str
) -> None:
    await backlog(rt, pool_name, expires_at=time.time() - 1)
    watchdog = await leading_watchdog(rt)
    for _ in range(10):  # 10,000 a tick at most
        await watchdog.expire_queued()
        if await count(rt, pool_name, TaskState.QUEUED) == 0:
            break
    assert await count(rt, pool_name, TaskState.EXPIRED) == BACKLOG
    async with rt.sessions() as session:
        left = await session.scalar(
            select(func.count())
            .select_from(Outbox)
            .join(Task, Task.id == Outbox.task_id)
            .where(Task.pool == pool_name)
        )
    assert left == 0, "their outbox rows are gone"


async def test_events_naming_more_tasks_than_a_statement_takes_lock_them_all(
    rt: Runtime, pool_name: str
) -> None:
    """What the events consumer does first with a batch: a full batch after an outage
    (1,000 messages of up to 500 events) names this many tasks."""
    ids = await backlog(rt, pool_name)
    async with rt.sessions.begin() as session:
        rows = await transitions.lock_rows(session, set(ids))
    assert set(rows) == set(ids)
