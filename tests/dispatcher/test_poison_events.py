"""No event can stop the events consumer: against the real broker and both databases.

An event whose handling raises is dead-lettered with the error, counted and acked; the events
before and after it are applied, and the consumer goes on. The fuzzed task that killed
``rexec serve`` (1,100 attempts, a 5e-324 s backoff) now simply retries.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence

import aio_pika
import anyio
import pytest
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from sqlalchemy import select

from rexec.dispatcher import statemachine
from rexec.dispatcher.db.models import Outbox, Pool, Task
from rexec.dispatcher.events import run_events
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages, names
from rexec.schemas.api import MAX_NESTING
from tests.support import await_until

pytestmark = pytest.mark.anyio

DEAD_EVENTS = names.dead_queue(names.DEAD_EVENTS_ROUTING_KEY)


async def make_pool(rt: Runtime, pool: str) -> None:
    async with rt.sessions.begin() as session:
        session.add(Pool(name=pool, description="", draining=False, created_at=time.time()))
    await rt.declare_pool(pool)


async def running_task(
    rt: Runtime, pool: str, *, attempt: int = 1, max_attempts: int = 3, backoff: float = 0.0
) -> str:
    """A task running attempt ``attempt`` on agent ``a``, written as an old row could be."""
    task_id = uuid.uuid4().hex
    async with rt.sessions.begin() as session:
        session.add(
            Task(
                id=task_id,
                pool=pool,
                kind="command",
                target="false",
                args_json="[]",
                kwargs_json="{}",
                argv_json='["false"]',
                state="running",
                attempt=attempt,
                max_attempts=max_attempts,
                retry_backoff=backoff,
                agent_id="a",
                created_at=time.time(),
                started_at=time.time(),
                cancel_requested=False,
            )
        )
    return task_id


async def load(rt: Runtime, task_id: str) -> Task:
    async with rt.sessions() as session:
        task = await session.get(Task, task_id)
    assert task is not None
    return task


def succeeded(task_id: str, result: object = 3, **fields: str) -> messages.Succeeded:
    return messages.Succeeded(
        task_id=task_id, attempt=1, agent_id="a", at=time.time(), result=result, **fields
    )


@pytest.fixture
async def events(rt: Runtime) -> AsyncIterator[AbstractExchange]:
    """``rexec.events`` on a confirming channel, with the dead events' queue emptied."""
    channel = await rt.connection.channel(publisher_confirms=True)
    await (await channel.get_queue(DEAD_EVENTS)).purge()
    yield await channel.get_exchange(names.EVENTS_EXCHANGE)
    await channel.close()


async def publish(exchange: AbstractExchange, *batch: messages.Event) -> None:
    body = messages.encode(messages.EventBatch(events=list(batch)))
    await exchange.publish(aio_pika.Message(body), routing_key="")


async def dead_letters(rt: Runtime, at_least: int) -> list[AbstractIncomingMessage]:
    channel = await rt.connection.channel()
    queue = await channel.get_queue(DEAD_EVENTS)
    found: list[AbstractIncomingMessage] = []

    async def enough() -> bool:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            found.append(message)
        return len(found) >= at_least

    await await_until(enough, 15, f"{at_least} dead-lettered event messages")
    return found


def tasks_of(message: AbstractIncomingMessage) -> Sequence[str]:
    return [
        e.task_id
        for e in messages.decode_events(message.body).events
        if isinstance(e, messages.TaskEvent)
    ]


async def until_state(rt: Runtime, task_id: str, state: str) -> Task:
    async def reached() -> Task | None:
        task = await load(rt, task_id)
        return task if task.state == state else None

    found = await await_until(reached, 15, f"task {task_id} to be {state}")
    assert found is not None
    return found


async def test_an_event_whose_handling_raises_is_dead_lettered_and_the_consumer_goes_on(
    rt: Runtime, pool_name: str, events: AbstractExchange, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_pool(rt, pool_name)
    before, poison, after, later = [await running_task(rt, pool_name) for _ in range(4)]
    decide = statemachine.on_event

    def on_event(task: statemachine.Snapshot, event: messages.TaskEvent) -> statemachine.Decision:
        if event.task_id == poison:
            raise ZeroDivisionError("a bug that only this event meets")
        return decide(task, event)

    monkeypatch.setattr(statemachine, "on_event", on_event)
    # Published before the consumer starts, so they arrive as one batch: the good events
    # around the poisonous one are applied all the same.
    await publish(events, succeeded(before))
    await publish(events, succeeded(poison))
    await publish(events, succeeded(after))
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_events, rt)
        await until_state(rt, before, "succeeded")
        await until_state(rt, after, "succeeded")
        [dead] = await dead_letters(rt, 1)
        # Still consuming: an event published afterwards is applied too.
        await publish(events, succeeded(later))
        await until_state(rt, later, "succeeded")
        tg.cancel_scope.cancel()
    assert tasks_of(dead) == [poison]
    reason = str((dead.headers or {}).get(names.REASON_HEADER))
    assert reason == (
        "handling the events failed: ZeroDivisionError: a bug that only this event meets"
    )
    assert (await load(rt, poison)).state == "running"
    failures = rt.metrics.registry.get_sample_value(
        "rexec_event_failures_total", {"error": "ZeroDivisionError"}
    )
    assert failures == 1


async def test_the_fuzzed_task_that_killed_serve_is_retried_like_any_other(
    rt: Runtime, pool_name: str, events: AbstractExchange
) -> None:
    """max_attempts 1100 and retry_backoff 5e-324, refused at submission now, in an old row:
    ``2.0 ** 1098`` overflowed in the consumer, which died, and died again on redelivery."""
    await make_pool(rt, pool_name)
    task_id = await running_task(rt, pool_name, attempt=1099, max_attempts=1100, backoff=5e-324)
    failed = messages.Failed(
        task_id=task_id,
        attempt=1099,
        agent_id="a",
        at=time.time(),
        error_type="CommandFailed",
        message="exit code 1",
    )
    await publish(events, failed)
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_events, rt)
        task = await until_state(rt, task_id, "queued")
        tg.cancel_scope.cancel()
    assert task.attempt == 1100
    async with rt.sessions() as session:
        rows = await session.execute(
            select(Outbox.attempt, Outbox.available_at).where(Outbox.task_id == task_id)
        )
        [(attempt, available_at)] = rows.all()
    assert attempt == 1100 and available_at <= time.time() + 300  # the longest backoff


async def test_a_result_nested_too_deeply_fails_the_attempt_for_good(
    rt: Runtime, pool_name: str, events: AbstractExchange
) -> None:
    await make_pool(rt, pool_name)
    deep, fine = await running_task(rt, pool_name), await running_task(rt, pool_name)
    too_deep: object = 1
    for _ in range(MAX_NESTING + 1):
        too_deep = [too_deep]
    deepest_allowed: object = 1
    for _ in range(MAX_NESTING):
        deepest_allowed = [deepest_allowed]
    await publish(events, succeeded(deep, too_deep), succeeded(fine, deepest_allowed))
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_events, rt)
        failed = await until_state(rt, deep, "failed")
        ok = await until_state(rt, fine, "succeeded")
        tg.cancel_scope.cancel()
    assert failed.attempt == 1 and failed.result_json is None  # not retried
    assert '"ResultTooDeep"' in (failed.error_json or "")
    assert f"more than {MAX_NESTING} levels" in (failed.error_json or "")
    assert ok.result_json is not None and ok.result_json.startswith("[" * MAX_NESTING)


async def test_a_nul_in_a_log_tail_is_stored_as_a_replacement_character(
    rt: Runtime, pool_name: str, events: AbstractExchange
) -> None:
    """A command's binary output ends up in the tail: PostgreSQL refuses NUL in text."""
    await make_pool(rt, pool_name)
    task_id = await running_task(rt, pool_name)
    ref = f"dir:{pool_name}/{task_id}/1.log"
    await publish(events, succeeded(task_id, log_tail="bin\x00ary\n", log_ref=ref))
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_events, rt)
        task = await until_state(rt, task_id, "succeeded")
        tg.cancel_scope.cancel()
    assert task.log_tail == "bin\ufffdary\n" and task.log_ref == ref


async def test_an_event_the_database_refuses_is_dead_lettered_with_the_reason(
    rt: Runtime, pool_name: str, events: AbstractExchange
) -> None:
    """A task id with a NUL: PostgreSQL refuses the lookup itself (SQLite finds no task)."""
    await make_pool(rt, pool_name)
    task_id = await running_task(rt, pool_name)
    bogus = messages.Started(task_id="x\x00y", attempt=1, agent_id="b", at=time.time())
    await publish(events, bogus)
    await publish(events, succeeded(task_id))
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_events, rt)
        await until_state(rt, task_id, "succeeded")
        if rt.engine.dialect.name == "postgresql":
            [dead] = await dead_letters(rt, 1)
            assert tasks_of(dead) == ["x\x00y"]
            reason = str((dead.headers or {}).get(names.REASON_HEADER))
            assert reason.startswith("handling the events failed: DBAPIError")
        tg.cancel_scope.cancel()
