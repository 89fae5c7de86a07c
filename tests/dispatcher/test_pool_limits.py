"""A pool's ``max_running``: the relay sends no more of its attempts while running plus sent
(not yet started) reaches the limit; the rest wait queued in the outbox, other pools go on."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select, update

from rexec.dispatcher.db.models import Outbox, Pool, Task
from rexec.dispatcher.relay import relay_once
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import names
from rexec.schemas.api import TaskState
from tests.dispatcher.test_relay_events import make_pool, make_task

pytestmark = pytest.mark.anyio


async def waiting(rt: Runtime, pool: str) -> int:
    async with rt.sessions() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(Outbox)
            .join(Task, Task.id == Outbox.task_id)
            .where(Task.pool == pool)
        )
    return int(count or 0)


async def queued_messages(rt: Runtime, pool: str) -> int:
    channel = await rt.connection.channel()
    try:
        queue = await channel.declare_queue(names.pool_queue(pool), passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def relay_rounds(rt: Runtime, rounds: int = 3) -> None:
    """A few relay rounds: enough to publish everything allowed (each round sends a batch)."""
    exchange = await rt.exchange(names.TASKS_EXCHANGE)
    for _ in range(rounds):
        await relay_once(rt, exchange)


async def set_state(rt: Runtime, task_id: str, state: TaskState) -> None:
    async with rt.sessions.begin() as session:
        await session.execute(update(Task).where(Task.id == task_id).values(state=state.value))


async def test_the_relay_keeps_a_pool_within_max_running(rt: Runtime, pool_name: str) -> None:
    limited, free = pool_name, f"{pool_name}-free"
    await make_pool(rt, limited)
    await make_pool(rt, free)
    async with rt.sessions.begin() as session:
        await session.execute(update(Pool).where(Pool.name == limited).values(max_running=2))
    ids = [await make_task(rt, limited) for _ in range(5)]

    await relay_rounds(rt)
    assert await waiting(rt, limited) == 3  # two sent, three held back in the outbox
    assert await queued_messages(rt, limited) == 2
    held = ids[2:]
    async with rt.sessions() as session:
        states = set(await session.scalars(select(Task.state).where(Task.id.in_(held))))
    assert states == {TaskState.QUEUED.value}

    # Another pool is not held up by the full one.
    other = await make_task(rt, free)
    await relay_rounds(rt)
    assert await waiting(rt, free) == 0 and await queued_messages(rt, free) == 1
    assert await waiting(rt, limited) == 3

    # Started: still busy (running + sent is 2), so nothing more goes out.
    await set_state(rt, ids[0], TaskState.RUNNING)
    await relay_rounds(rt)
    assert await waiting(rt, limited) == 3

    # Finished: one slot frees, exactly one more attempt is sent.
    await set_state(rt, ids[0], TaskState.SUCCEEDED)
    await relay_rounds(rt)
    assert await waiting(rt, limited) == 2
    assert await queued_messages(rt, limited) == 3

    # Raising the limit lets the rest go.
    async with rt.sessions.begin() as session:
        await session.execute(update(Pool).where(Pool.name == limited).values(max_running=None))
    await relay_rounds(rt)
    assert await waiting(rt, limited) == 0
    assert await queued_messages(rt, limited) == 5
    assert other


async def test_a_full_pool_asks_the_relay_to_look_again_soon(rt: Runtime, pool_name: str) -> None:
    await make_pool(rt, pool_name)
    async with rt.sessions.begin() as session:
        await session.execute(update(Pool).where(Pool.name == pool_name).values(max_running=1))
    for _ in range(2):
        await make_task(rt, pool_name)
    exchange = await rt.exchange(names.TASKS_EXCHANGE)
    await relay_once(rt, exchange)
    before = time.time()
    _, next_due = await relay_once(rt, exchange)
    # Held back: the relay looks again within a fraction of a second, not at its idle poll.
    assert next_due is not None and next_due - before < 0.5
