"""The watchdog in-process against real Redis and databases: who it judges, and when not."""

from __future__ import annotations

import time

import aio_pika
import pytest
from sqlalchemy import func, select, update

from rexec.dispatcher.db.models import Leader, Outbox, Task
from rexec.dispatcher.runtime import Runtime
from rexec.dispatcher.watchdog import Watchdog
from rexec.schemas import names
from rexec.schemas.api import TaskState
from tests.dispatcher.test_relay_events import make_pool, make_task
from tests.support import await_until


async def leading_watchdog(rt: Runtime, trusted: bool = True) -> Watchdog:
    watchdog = Watchdog(rt, replica=f"test-{time.monotonic_ns()}")
    watchdog.lease.name = f"watchdog-{time.monotonic_ns()}"  # not the leader row of other tests
    assert await watchdog.lease.acquire()
    if trusted:
        await rt.redis.set(watchdog.gate.epoch_key, "x")
        assert await watchdog.gate.trusted()
    return watchdog


async def task_row(rt: Runtime, task_id: str) -> Task:
    async with rt.sessions() as session:
        task = await session.get(Task, task_id)
        assert task is not None
        return task


@pytest.mark.anyio
async def test_a_running_task_of_a_dead_agent_is_requeued_as_a_new_attempt(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, TaskState.RUNNING, agent="gone-agent", outbox=False)
    watchdog = await leading_watchdog(rt)
    await watchdog.requeue_lost()
    task = await task_row(rt, task_id)
    assert (task.state, task.attempt, task.agent_id) == ("queued", 2, None)
    async with rt.sessions() as session:
        assert await session.scalar(select(Outbox.attempt).where(Outbox.task_id == task_id)) == 2
    assert await rt.redis.get(rt.keys.lease(pool_name, task_id, 1)) == b"watchdog", (
        "the old lease is fenced"
    )


@pytest.mark.anyio
async def test_a_live_agent_keeps_its_tasks(rt: Runtime, pool_name: str) -> None:
    await make_pool(rt, pool_name)
    await rt.redis.set(rt.keys.agent("live-agent"), b"{}", ex=30)
    task_id = await make_task(rt, pool_name, TaskState.RUNNING, agent="live-agent", outbox=False)
    await (await leading_watchdog(rt)).requeue_lost()
    assert (await task_row(rt, task_id)).state == "running"


@pytest.mark.anyio
async def test_after_redis_lost_its_data_no_one_is_judged_for_one_ttl(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, TaskState.RUNNING, agent="quiet-agent", outbox=False)
    watchdog = await leading_watchdog(rt, trusted=False)
    await rt.redis.delete(watchdog.gate.epoch_key)  # as after a restart that lost every key
    assert not await watchdog.gate.trusted()
    await watchdog.tick()
    assert (await task_row(rt, task_id)).state == "running", "judged during the grace period"
    watchdog.gate.trusted_from = time.time() - 1  # one TTL later
    await watchdog.tick()
    assert (await task_row(rt, task_id)).state == "queued"


@pytest.mark.anyio
async def test_another_redis_server_answering_starts_the_grace(rt: Runtime, pool_name: str) -> None:
    """A Sentinel failover: the promoted replica has the epoch key but may lack the newest
    heartbeat writes. Its run_id differs from the server trusted before, so grace first."""
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, TaskState.RUNNING, agent="beat-lost", outbox=False)
    watchdog = await leading_watchdog(rt)
    assert watchdog.gate.server, "the gate knows which server it trusts"
    watchdog.gate.server = "run-id-of-the-old-master"
    await watchdog.tick()
    assert (await task_row(rt, task_id)).state == "running", "judged right after a failover"
    assert watchdog.gate.trusted_from > time.time()
    watchdog.gate.trusted_from = time.time() - 1  # one TTL later
    await watchdog.tick()
    assert (await task_row(rt, task_id)).state == "queued"


@pytest.mark.anyio
async def test_a_failover_between_the_gate_and_the_key_check_judges_no_one(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, TaskState.RUNNING, agent="beat-lost-2", outbox=False)
    watchdog = await leading_watchdog(rt)
    real = watchdog.gate.server
    watchdog.gate.server = "run-id-of-the-old-master"  # what the gate saw a moment ago
    await watchdog.requeue_lost()
    assert (await task_row(rt, task_id)).state == "running"
    assert watchdog.gate.server == real and watchdog.gate.trusted_from > time.time()
    assert not await watchdog.gate.trusted(), "in grace until one TTL has passed"


@pytest.mark.anyio
async def test_a_replica_that_lost_the_lease_changes_nothing(rt: Runtime, pool_name: str) -> None:
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, TaskState.RUNNING, agent="gone-agent-2", outbox=False)
    watchdog = await leading_watchdog(rt)
    async with rt.sessions.begin() as session:  # another replica took over meanwhile
        await session.execute(
            update(Leader).where(Leader.name == watchdog.lease.name).values(epoch=Leader.epoch + 1)
        )
    await watchdog.requeue_lost()
    assert (await task_row(rt, task_id)).state == "running"


@pytest.mark.anyio
async def test_an_attempt_past_its_timeout_is_timed_out_by_the_backstop(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    await rt.redis.set(rt.keys.agent("stuck-agent"), b"{}", ex=30)
    task_id = await make_task(
        rt, pool_name, TaskState.RUNNING, attempt=3, agent="stuck-agent", outbox=False
    )
    async with rt.sessions.begin() as session:
        await session.execute(
            update(Task).where(Task.id == task_id).values(timeout=1.0, started_at=time.time() - 120)
        )
    await (await leading_watchdog(rt)).backstop_timeouts()
    task = await task_row(rt, task_id)
    assert task.state == "timed_out" and "timeout" in (task.error_json or "")


@pytest.mark.anyio
async def test_the_backstop_leaves_a_live_agent_time_for_a_lagging_events_queue(
    rt: Runtime, pool_name: str
) -> None:
    """Issue 20, item 9: 30 s past its timeout, a live agent's attempt may have ended and its
    report still wait in the events queue behind a backlog; the backstop waits longer."""
    await make_pool(rt, pool_name)
    await rt.redis.set(rt.keys.agent("busy-agent"), b"{}", ex=30)
    task_id = await make_task(rt, pool_name, TaskState.RUNNING, agent="busy-agent", outbox=False)
    async with rt.sessions.begin() as session:
        await session.execute(
            update(Task).where(Task.id == task_id).values(timeout=1.0, started_at=time.time() - 31)
        )
    await (await leading_watchdog(rt)).backstop_timeouts()
    assert (await task_row(rt, task_id)).state == "running"


@pytest.mark.anyio
async def test_queued_tasks_past_their_start_deadline_expire_even_in_a_drained_pool(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name, draining=True)
    task_id = await make_task(rt, pool_name)
    async with rt.sessions.begin() as session:
        await session.execute(
            update(Task).where(Task.id == task_id).values(expires_at=time.time() - 1)
        )
    await (await leading_watchdog(rt)).expire_queued()
    assert (await task_row(rt, task_id)).state == "expired"
    async with rt.sessions() as session:
        assert (
            await session.scalar(
                select(func.count()).select_from(Outbox).where(Outbox.task_id == task_id)
            )
            == 0
        )
    assert await rt.redis.exists(rt.keys.cancelled(pool_name, task_id)), (
        "copies already queued must not start"
    )


@pytest.mark.anyio
async def test_a_message_redelivered_past_the_delivery_limit_is_dead_lettered(
    rt: Runtime, pool_name: str
) -> None:
    """Poison that crashes agents before they ack is stopped by the quorum delivery limit."""
    await make_pool(rt, pool_name)
    channel = await rt.connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(names.TASKS_EXCHANGE)
    await exchange.publish(aio_pika.Message(b"poison", delivery_mode=2), routing_key=pool_name)
    queue = await channel.get_queue(names.pool_queue(pool_name))
    for _ in range(rt.settings.delivery_limit + 1):
        message = await await_until(lambda: queue.get(fail=False), 10, "the poison message")
        await message.nack(requeue=True)
    dead = await channel.get_queue(names.dead_queue(pool_name))
    message = await await_until(lambda: dead.get(no_ack=True, fail=False), 10, "the dead letter")
    assert message.body == b"poison"
    assert (message.headers or {}).get("x-death") or (message.headers or {}).get(
        "x-first-death-reason"
    )
