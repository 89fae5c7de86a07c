"""The dead-letter consumer against the real broker and both databases.

Task messages published to ``rexec.dead`` as an agent parks them (with ``x-rexec-reason``)
or as the broker moves them at the delivery limit (with ``x-death``): each task still queued
at that attempt ends failed with the reason, or is published again; what is no task message,
names no known task, or is not signed by this plane fails nothing, and every dead letter is
acked once handled.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import anyio
import pytest
from aio_pika.abc import AbstractExchange
from pamqp.common import FieldTable
from sqlalchemy import select

from rexec.dispatcher.db.models import Outbox, Pool, Task, TaskTransition
from rexec.dispatcher.deadletters import run_dead_letters
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages, names, signing
from rexec.schemas.api import TaskState
from tests.dispatcher.test_relay_events import make_task
from tests.support import await_until

pytestmark = pytest.mark.anyio


async def queued_task(rt: Runtime, pool: str, *, state: str = "queued", attempts: int = 3) -> str:
    return await make_task(rt, pool, TaskState(state), outbox=False, max_attempts=attempts)


def body(pool: str, *task_ids: str) -> tuple[bytes, str]:
    """A task message (one id) or a batch (several), and its type."""
    tasks = [
        messages.TaskMessage(
            task_id=t, attempt=1, pool=pool, kind="function", target="tests.tasks:add"
        )
        for t in task_ids
    ]
    if len(tasks) == 1:
        return messages.encode(tasks[0]), messages.TASK_TYPE
    return messages.encode(messages.TaskBatch(tasks=tasks)), messages.TASK_BATCH_TYPE


@pytest.fixture
async def pool(rt: Runtime) -> str:
    name = f"p{uuid.uuid4().hex[:10]}"
    async with rt.sessions.begin() as session:
        session.add(Pool(name=name, description="", draining=False, created_at=time.time()))
    await rt.declare_pool(name)
    return name


@pytest.fixture
async def dead(rt: Runtime, pool: str) -> AsyncIterator[AbstractExchange]:
    """``rexec.dead`` to publish to, with the dispatcher's dead-letter consumer running."""
    channel = await rt.connection.channel(publisher_confirms=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_dead_letters, rt)
        yield await channel.get_exchange(names.DEAD_EXCHANGE)
        await await_until(lambda: dead_queue_empty(rt, pool), 15, "every dead letter acked")
        tg.cancel_scope.cancel()
    await channel.close()


async def dead_queue_empty(rt: Runtime, pool: str) -> bool:
    channel = await rt.connection.channel()
    try:
        queue = await channel.declare_queue(names.dead_queue(pool), passive=True)
        result = queue.declaration_result
        return result.message_count == 0 and result.consumer_count >= 1
    finally:
        await channel.close()


async def publish(
    exchange: AbstractExchange,
    pool: str,
    content: bytes,
    kind: str | None,
    headers: FieldTable,
    signer: signing.Signer | None,
) -> None:
    if signer is not None:
        headers = {**headers, signing.SIGNATURE_HEADER: signer.sign(content)}
    await exchange.publish(aio_pika.Message(content, headers=headers, type=kind), routing_key=pool)


async def load(rt: Runtime, task_id: str) -> tuple[Task, list[str], list[int]]:
    """The task, the reasons of its history, and the attempts its outbox rows publish."""
    async with rt.sessions() as session:
        task = await session.get(Task, task_id)
        reasons = await session.scalars(
            select(TaskTransition.reason)
            .where(TaskTransition.task_id == task_id)
            .order_by(TaskTransition.id)
        )
        outbox = await session.scalars(select(Outbox.attempt).where(Outbox.task_id == task_id))
        assert task is not None
        return task, [r or "" for r in reasons], list(outbox)


async def ended(rt: Runtime, task_id: str) -> Task:
    async def check() -> Task | None:
        task, _, _ = await load(rt, task_id)
        return task if task.state != "queued" else None

    return await await_until(check, 15, f"task {task_id} to leave queued")


async def test_an_agent_side_dead_letter_fails_each_queued_task_with_its_reason(
    rt: Runtime, pool: str, dead: AbstractExchange
) -> None:
    """A batch an agent refused (its pinned keys lag a rotation): both tasks fail, saying
    which agent refused it and why; the task that has started meanwhile is left alone."""
    first, second = await queued_task(rt, pool), await queued_task(rt, pool)
    started = await queued_task(rt, pool, state="running")
    content, _ = body(pool, first, second, started)
    refusal = "refused: bad signature: the message was altered or not signed by this plane"
    headers: FieldTable = {names.REASON_HEADER: refusal, names.DEAD_LETTER_AGENT_HEADER: "a-1"}
    await publish(dead, pool, content, None, headers, rt.signer)  # an agent's copy: no type

    expected = f"dead_lettered by agent a-1: {refusal}"
    for task_id in (first, second):
        task = await ended(rt, task_id)
        _, reasons, outbox = await load(rt, task_id)
        assert task.state == "failed" and task.attempt == 1
        assert json.loads(task.error_json or "{}") == {"type": "DeadLettered", "message": expected}
        assert reasons == [expected] and outbox == []
    task, reasons, _ = await load(rt, started)
    assert task.state == "running" and reasons == []


async def test_a_delivery_limit_dead_letter_retries_while_attempts_remain(
    rt: Runtime, pool: str, dead: AbstractExchange
) -> None:
    spare, last = await queued_task(rt, pool), await queued_task(rt, pool, attempts=1)
    death: FieldTable = {
        "x-death": [
            {
                "count": 1,
                "reason": "delivery_limit",
                "queue": names.pool_queue(pool),
                "exchange": names.TASKS_EXCHANGE,
                "routing-keys": [pool],
            }
        ],
        "x-first-death-reason": "delivery_limit",
    }
    for task_id in (spare, last):
        content, kind = body(pool, task_id)
        await publish(dead, pool, content, kind, death, rt.signer)

    record = f"x-death: reason=delivery_limit, queue={names.pool_queue(pool)}, count=1"
    expected = f"dead_lettered: delivery limit reached ({record})"
    task = await ended(rt, last)
    assert task.state == "failed" and json.loads(task.error_json or "{}")["message"] == expected

    async def retried() -> bool:
        task, _, outbox = await load(rt, spare)
        return task.attempt == 2 and outbox == [2]

    await await_until(retried, 15, "the next attempt of the task with attempts to spare")
    task, reasons, _ = await load(rt, spare)
    assert task.state == "queued" and reasons == [expected]


async def test_an_unsigned_dead_letter_fails_nothing_and_republishes_the_attempt(
    rt: Runtime, pool: str, dead: AbstractExchange
) -> None:
    """A forgery naming a real task (or a message of a key retired since) cannot end it."""
    task_id = await queued_task(rt, pool)
    content, kind = body(pool, task_id)
    forger = signing.Signer(signing.generate_private_key())
    headers: FieldTable = {names.REASON_HEADER: "refused: bad signature"}
    await publish(dead, pool, content, kind, headers, forger)

    async def republished() -> bool:
        _, _, outbox = await load(rt, task_id)
        return outbox == [1]

    await await_until(republished, 15, "the same attempt published again")
    task, reasons, _ = await load(rt, task_id)
    assert task.state == "queued" and task.attempt == 1
    assert "not signed by this plane's keys" in reasons[0]


async def test_dead_letters_that_name_no_queued_task_are_acked_and_change_nothing(
    rt: Runtime, pool: str, dead: AbstractExchange
) -> None:
    task_id = await queued_task(rt, pool)
    headers: FieldTable = {names.REASON_HEADER: "malformed"}
    await publish(dead, pool, b"not json at all", None, headers, None)
    content, kind = body(pool, uuid.uuid4().hex)  # an unknown task
    await publish(dead, pool, content, kind, headers, rt.signer)
    stale = messages.TaskMessage(
        task_id=task_id, attempt=7, pool=pool, kind="function", target="tests.tasks:add"
    )
    await publish(dead, pool, messages.encode(stale), messages.TASK_TYPE, headers, rt.signer)

    await await_until(lambda: dead_queue_empty(rt, pool), 15, "the dead letters acked")
    task, reasons, outbox = await load(rt, task_id)
    assert (task.state, task.attempt, reasons, outbox) == ("queued", 1, [], [])
