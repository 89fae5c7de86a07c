"""The relay's batches against the real broker and both databases: several attempts of a pool
in one signed message where its agents speak 1.2, one per message where one does not; and a
``returned`` attempt published again."""

from __future__ import annotations

import time
import uuid

import aio_pika
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select

from rexec.dispatcher.db.models import Agent, Outbox, Task, TaskTransition
from rexec.dispatcher.events import apply_events
from rexec.dispatcher.relay import relay_once
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages, names, signing, tracing
from tests.dispatcher.test_relay_events import make_pool, make_task
from tests.support import await_until

pytestmark = pytest.mark.anyio


async def add_agent(rt: Runtime, pool: str, *, minor: int, concurrency: int) -> str:
    agent_id = f"agent-{uuid.uuid4().hex[:8]}"
    async with rt.sessions.begin() as session:
        session.add(
            Agent(
                id=agent_id,
                pool=pool,
                hostname="h",
                pid=1,
                concurrency=concurrency,
                version=messages.PROTOCOL_VERSION,
                protocol_minor=minor,
                state="online",
                registered_at=time.time(),
            )
        )
    return agent_id


async def relay_all(rt: Runtime, task_ids: list[str]) -> None:
    """Relay until none of ``task_ids`` is left in the outbox."""
    exchange = await rt.exchange(names.TASKS_EXCHANGE)

    async def published() -> bool:
        await relay_once(rt, exchange)
        async with rt.sessions() as session:
            left = await session.scalars(select(Outbox.id).where(Outbox.task_id.in_(task_ids)))
            return not left.all()

    await await_until(published, 30, "the relay to publish every task")


async def take_all(
    rt: Runtime, pool: str, count: int
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    channel = await rt.connection.channel()
    queue = await channel.get_queue(names.pool_queue(pool))
    taken: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def all_taken() -> bool:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
        return sum(len(tasks_of(m)) for m in taken) >= count

    await await_until(all_taken, 10, f"{count} tasks in {names.pool_queue(pool)}")
    return taken


def tasks_of(message: aio_pika.abc.AbstractIncomingMessage) -> list[messages.TaskMessage]:
    if message.type == messages.TASK_BATCH_TYPE:
        return messages.decode_task_batch(message.body).tasks
    assert message.type == messages.TASK_TYPE
    return [messages.decode_task(message.body)]


async def test_attempts_for_agents_that_speak_1_2_travel_in_signed_batches(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    await add_agent(rt, pool_name, minor=messages.PROTOCOL_MINOR, concurrency=4)
    await add_agent(rt, pool_name, minor=messages.PROTOCOL_MINOR, concurrency=8)
    ids = [await make_task(rt, pool_name) for _ in range(10)]
    await relay_all(rt, ids)
    taken = await take_all(rt, pool_name, 10)
    verifier = signing.Verifier(rt.public_keys)
    for message in taken:
        verifier.verify(message.body, (message.headers or {}).get(signing.SIGNATURE_HEADER))
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    # At most the smallest concurrency (4) per message, and at most half of the burst each.
    assert sorted(len(tasks_of(m)) for m in taken) == [2, 4, 4]
    assert {t.task_id for m in taken for t in tasks_of(m)} == set(ids)
    assert {t.attempt for m in taken for t in tasks_of(m)} == {1}
    assert rt.metrics.attempts_published.labels(pool_name)._value.get() == 10
    assert rt.metrics.task_messages.labels(pool_name)._value.get() == 3


async def test_a_pool_with_an_agent_older_than_1_2_gets_one_task_per_message(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    await add_agent(rt, pool_name, minor=messages.PROTOCOL_MINOR, concurrency=8)
    await add_agent(rt, pool_name, minor=messages.BATCHES_FROM_MINOR - 1, concurrency=8)
    ids = [await make_task(rt, pool_name) for _ in range(3)]
    await relay_all(rt, ids)
    taken = await take_all(rt, pool_name, 3)
    assert [m.type for m in taken] == [messages.TASK_TYPE] * 3
    assert sorted(messages.decode_task(m.body).task_id for m in taken) == sorted(ids)


async def test_a_returned_attempt_is_published_again_unchanged(rt: Runtime, pool_name: str) -> None:
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, outbox=False)  # published, delivered, not started
    event = messages.Returned(
        task_id=task_id, attempt=1, agent_id="agent-x", at=time.time(), reason="no_slot"
    )
    await apply_events(rt, [event])
    async with rt.sessions() as session:
        task = await session.get(Task, task_id)
        assert task is not None
        assert (task.state, task.attempt) == ("queued", 1)
        [outbox] = (await session.scalars(select(Outbox).where(Outbox.task_id == task_id))).all()
        assert outbox.attempt == 1
        reasons = await session.scalars(
            select(TaskTransition.reason).where(TaskTransition.task_id == task_id)
        )
        assert reasons.all() == ["returned: no_slot"]
    await relay_all(rt, [task_id])
    [message] = await take_all(rt, pool_name, 1)
    assert [(t.task_id, t.attempt) for t in tasks_of(message)] == [(task_id, 1)]


async def test_an_attempt_held_elsewhere_is_published_again_after_a_pause(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, outbox=False)
    at = time.time()
    event = messages.Returned(
        task_id=task_id, attempt=1, agent_id="agent-x", at=at, reason=messages.HELD_ELSEWHERE
    )
    await apply_events(rt, [event])
    async with rt.sessions() as session:
        [outbox] = (await session.scalars(select(Outbox).where(Outbox.task_id == task_id))).all()
    assert outbox.attempt == 1
    assert at + 0.5 < outbox.available_at < time.time() + 1.5


async def test_a_return_of_a_task_that_has_started_elsewhere_changes_nothing(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, outbox=False)
    at = time.time()
    await apply_events(
        rt, [messages.Started(task_id=task_id, attempt=1, agent_id="agent-y", at=at)]
    )
    await apply_events(
        rt,
        [
            messages.Returned(
                task_id=task_id, attempt=1, agent_id="agent-x", at=at, reason="no_slot"
            )
        ],
    )
    async with rt.sessions() as session:
        task = await session.get(Task, task_id)
        assert task is not None
        assert (task.state, task.agent_id) == ("running", "agent-y")
        assert not (await session.scalars(select(Outbox).where(Outbox.task_id == task_id))).all()


async def test_each_attempt_of_a_batch_has_its_send_span_and_carries_its_context(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    await add_agent(rt, pool_name, minor=messages.PROTOCOL_MINOR, concurrency=4)
    ids = [await make_task(rt, pool_name) for _ in range(2)]
    creates = {task_id: f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01" for task_id in ids}
    async with rt.sessions.begin() as session:
        for task_id, traceparent in creates.items():
            task = await session.get(Task, task_id)
            assert task is not None
            task.trace_parent = traceparent
    exporter = InMemorySpanExporter()
    tracing.configure("rexec-dispatcher", exporter=exporter)
    try:
        await relay_all(rt, ids)
    finally:
        tracing.shutdown()
    [message] = await take_all(rt, pool_name, 2)
    batch = messages.decode_task_batch(message.body)
    sends = {
        (span.attributes or {})["rexec.task.id"]: span
        for span in exporter.get_finished_spans()
        if span.name == f"send {names.pool_queue(pool_name)}"
    }
    for task, traceparent in zip(batch.tasks, batch.traceparents, strict=True):
        span = sends[task.task_id]
        _, trace_id, parent_id, _ = creates[task.task_id].split("-")
        assert span.parent is not None and format(span.parent.span_id, "016x") == parent_id
        assert format(span.context.trace_id, "032x") == trace_id
        assert traceparent == f"00-{trace_id}-{format(span.context.span_id, '016x')}-01"
