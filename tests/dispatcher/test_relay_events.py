"""The relay and the events consumer against the real broker and both databases."""

from __future__ import annotations

import time
import uuid

import aio_pika
import anyio
import pytest
from sqlalchemy import func, select

from rexec.dispatcher.db.models import Outbox, Pool, Task, TaskLog, TaskTransition
from rexec.dispatcher.events import apply_events, run_events
from rexec.dispatcher.relay import relay_once
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages, names
from rexec.schemas.api import TaskState
from tests.support import await_until


async def make_pool(rt: Runtime, pool: str, draining: bool = False) -> None:
    async with rt.sessions.begin() as session:
        session.add(Pool(name=pool, description="", draining=draining, created_at=time.time()))
    await rt.declare_pool(pool)


async def make_task(
    rt: Runtime,
    pool: str,
    state: TaskState = TaskState.QUEUED,
    attempt: int = 1,
    agent: str | None = None,
    outbox: bool = True,
    max_attempts: int = 3,
) -> str:
    task_id = uuid.uuid4().hex
    async with rt.sessions.begin() as session:
        session.add(
            Task(
                id=task_id,
                pool=pool,
                kind="function",
                target="tests.tasks:add",
                args_json="[1, 2]",
                kwargs_json="{}",
                argv_json="[]",
                state=state.value,
                attempt=attempt,
                max_attempts=max_attempts,
                retry_backoff=0.0,
                agent_id=agent,
                created_at=time.time(),
                cancel_requested=False,
            )
        )
        if outbox:
            await session.flush()
            session.add(Outbox(task_id=task_id, attempt=attempt, available_at=time.time()))
    return task_id


async def relay_until_gone(
    rt: Runtime, exchange: aio_pika.abc.AbstractExchange, task_id: str
) -> None:
    async def gone() -> bool:
        await relay_once(rt, exchange)
        async with rt.sessions() as session:
            rows = await session.scalar(
                select(func.count()).select_from(Outbox).where(Outbox.task_id == task_id)
            )
        return rows == 0

    await await_until(gone, 30, "the relay to publish the task")


async def get_one(rt: Runtime, queue_name: str) -> aio_pika.abc.AbstractIncomingMessage:
    channel = await rt.connection.channel()
    queue = await channel.get_queue(queue_name)

    async def fetch() -> aio_pika.abc.AbstractIncomingMessage | None:
        return await queue.get(no_ack=True, fail=False)

    return await await_until(fetch, 10, f"a message on {queue_name}")


@pytest.mark.anyio
async def test_relay_publishes_the_committed_attempt_then_clears_the_outbox(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name)
    exchange = await rt.exchange(names.TASKS_EXCHANGE)
    await relay_until_gone(rt, exchange, task_id)  # other tests' rows may come first
    message = await get_one(rt, names.pool_queue(pool_name))
    task = messages.decode_task(message.body)
    assert (task.task_id, task.attempt, task.args, task.target) == (
        task_id,
        1,
        [1, 2],
        "tests.tasks:add",
    )
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


@pytest.mark.anyio
async def test_the_relay_drops_the_row_of_an_attempt_the_task_left_without_publishing_it(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, attempt=2)
    async with rt.sessions.begin() as session:
        session.add(Outbox(task_id=task_id, attempt=1, available_at=time.time()))
    exchange = await rt.exchange(names.TASKS_EXCHANGE)
    await relay_until_gone(rt, exchange, task_id)
    message = await get_one(rt, names.pool_queue(pool_name))
    assert messages.decode_task(message.body).attempt == 2
    channel = await rt.connection.channel()
    queue = await channel.get_queue(names.pool_queue(pool_name))
    assert await queue.get(no_ack=True, fail=False) is None


@pytest.mark.anyio
async def test_a_drained_pool_keeps_its_work_in_the_outbox(rt: Runtime, pool_name: str) -> None:
    await make_pool(rt, pool_name, draining=True)
    task_id = await make_task(rt, pool_name)
    exchange = await rt.exchange(names.TASKS_EXCHANGE)
    await relay_once(rt, exchange)
    async with rt.sessions() as session:
        assert (
            await session.scalar(
                select(func.count()).select_from(Outbox).where(Outbox.task_id == task_id)
            )
            == 1
        )


@pytest.mark.anyio
async def test_a_missing_pool_queue_is_declared_again_and_nothing_is_lost(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    channel = await rt.connection.channel()
    await channel.queue_delete(names.pool_queue(pool_name))
    task_id = await make_task(rt, pool_name)
    exchange = await rt.exchange(names.TASKS_EXCHANGE)
    # The first try is unroutable: the row stays and the queue is declared again.
    await relay_until_gone(rt, exchange, task_id)
    message = await get_one(rt, names.pool_queue(pool_name))
    assert messages.decode_task(message.body).task_id == task_id


@pytest.mark.anyio
async def test_events_apply_once_and_stale_attempts_are_rejected_and_counted(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    task_id = await make_task(
        rt, pool_name, TaskState.RUNNING, attempt=2, agent="new", outbox=False
    )
    stale = messages.Succeeded(
        task_id=task_id, attempt=1, agent_id="old", at=time.time(), result="late"
    )
    fresh = messages.Succeeded(
        task_id=task_id, attempt=2, agent_id="new", at=time.time(), result={"ok": True}
    )
    await apply_events(rt, [stale, fresh, fresh])
    async with rt.sessions() as session:
        task = await session.get(Task, task_id)
        assert task is not None
        assert (task.state, task.result_json) == ("succeeded", '{"ok":true}')
        history = (
            await session.scalars(
                select(TaskTransition.to_state).where(TaskTransition.task_id == task_id)
            )
        ).all()
    assert history == ["succeeded"]
    rejected = {
        reason: rt.metrics.stale_events.labels(reason)._value.get()
        for reason in ("stale_attempt", "already_terminal")
    }
    assert rejected == {"stale_attempt": 1, "already_terminal": 1}


@pytest.mark.anyio
async def test_one_batch_starts_and_ends_an_attempt_and_starts_another_task(
    rt: Runtime, pool_name: str
) -> None:
    """Later events of a batch see the earlier ones' effect; tasks changed in different columns
    are all written."""
    await make_pool(rt, pool_name)
    ran = await make_task(rt, pool_name, outbox=False)
    started_only = await make_task(rt, pool_name, outbox=False)
    at = time.time()
    await apply_events(
        rt,
        [
            messages.Started(task_id=ran, attempt=1, agent_id="a", at=at),
            messages.Started(task_id=started_only, attempt=1, agent_id="b", at=at),
            messages.Succeeded(
                task_id=ran,
                attempt=1,
                agent_id="a",
                at=at,
                result=[1],
                log_ref=f"dir:{pool_name}/{ran}/1.log",
                log_tail="done\n",
            ),
        ],
    )
    async with rt.sessions() as session:
        task = await session.get(Task, ran)
        other = await session.get(Task, started_only)
        log = await session.get(TaskLog, (ran, 1))
        history = (
            await session.execute(
                select(TaskTransition.task_id, TaskTransition.from_state, TaskTransition.to_state)
                .where(TaskTransition.task_id.in_([ran, started_only]))
                .order_by(TaskTransition.id)
            )
        ).all()
    assert task is not None and other is not None and log is not None
    assert (task.state, task.agent_id, task.result_json, task.log_tail) == (
        "succeeded",
        "a",
        "[1]",
        "done\n",
    )
    assert task.started_at is not None and task.finished_at is not None
    assert task.log_ref == log.log_ref == f"dir:{pool_name}/{ran}/1.log"
    assert (log.agent_id, log.log_tail) == ("a", "done\n")
    assert (other.state, other.agent_id, other.finished_at) == ("running", "b", None)
    assert [tuple(row) for row in history] == [
        (ran, "queued", "running"),
        (started_only, "queued", "running"),
        (ran, "running", "succeeded"),
    ]
    # The run time is observed from the start the same batch recorded.
    run_time = rt.metrics.registry.get_sample_value(
        "rexec_run_seconds_count", {"pool": pool_name, "state": "succeeded"}
    )
    assert run_time == 1


@pytest.mark.anyio
async def test_a_failed_attempt_is_retried_as_a_new_attempt_through_the_outbox(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, TaskState.RUNNING, attempt=1, agent="a", outbox=False)
    failed = messages.Failed(
        task_id=task_id,
        attempt=1,
        agent_id="a",
        at=time.time(),
        error_type="ValueError",
        message="boom",
    )
    await apply_events(rt, [failed])
    async with rt.sessions() as session:
        task = await session.get(Task, task_id)
        assert task is not None and (task.state, task.attempt, task.agent_id) == ("queued", 2, None)
        assert '"ValueError"' in (task.error_json or "")
        outbox = (await session.scalars(select(Outbox).where(Outbox.task_id == task_id))).all()
    assert [o.attempt for o in outbox] == [2]


@pytest.mark.anyio
async def test_a_malformed_event_message_is_dead_lettered_with_the_reason_and_consuming_goes_on(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, TaskState.RUNNING, agent="a", outbox=False)
    channel = await rt.connection.channel(publisher_confirms=True)
    await (await channel.get_queue(names.dead_queue(names.DEAD_EVENTS_ROUTING_KEY))).purge()
    events = await channel.get_exchange(names.EVENTS_EXCHANGE)
    await events.publish(
        aio_pika.Message(b'{"v": 1, "events": [{"type": "bogus"}]}'), routing_key=""
    )
    good = messages.EventBatch(
        events=[
            messages.Succeeded(task_id=task_id, attempt=1, agent_id="a", at=time.time(), result=3)
        ]
    )
    await events.publish(aio_pika.Message(messages.encode(good)), routing_key="")

    async def succeeded() -> bool:
        async with rt.sessions() as session:
            task = await session.get(Task, task_id)
            return task is not None and task.state == "succeeded"

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_events, rt)
        await await_until(succeeded, 15, "the good event to be applied")
        dead = await get_one(rt, names.dead_queue(names.DEAD_EVENTS_ROUTING_KEY))
        tg.cancel_scope.cancel()
    reason = str((dead.headers or {}).get(names.REASON_HEADER))
    assert "malformed event message" in reason and "bogus" in reason
