"""New tasks published the moment their submit commits, against the real broker and both
databases: no relay round on the way, the outbox row cleared once confirmed, and the relay as
the backstop when that publish never happens (the dispatcher died after the commit) or fails."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio
import msgspec
import pytest
from sqlalchemy import select, update

from rexec.dispatcher import service
from rexec.dispatcher.db.models import Outbox, Pool
from rexec.dispatcher.direct import DirectPublisher
from rexec.dispatcher.outbox import Due
from rexec.dispatcher.relay import BATCH_SIZE, relay_once
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages, names, signing
from rexec.schemas.api import SubmitTask
from tests.dispatcher.test_relay_batches import add_agent, take_all, tasks_of
from tests.dispatcher.test_relay_events import make_pool
from tests.support import await_until

pytestmark = pytest.mark.anyio

LEASE = 5.0


Publisher = TypeVar("Publisher", bound=DirectPublisher)


@asynccontextmanager
async def running(
    rt: Runtime, publisher: Publisher, lease: float = LEASE
) -> AsyncIterator[Publisher]:
    """``publisher`` running as the runtime's, as ``rexec serve`` runs it (no relay)."""
    rt.settings = msgspec.structs.replace(rt.settings, outbox_lease=lease)
    async with anyio.create_task_group() as tg:
        rt.direct = publisher
        await tg.start(publisher.run)
        try:
            yield publisher
        finally:
            tg.cancel_scope.cancel()
            rt.direct = None


@pytest.fixture
async def direct(rt: Runtime) -> AsyncIterator[DirectPublisher]:
    async with running(rt, DirectPublisher(rt)) as publisher:
        yield publisher


def add(pool: str, i: int = 0) -> SubmitTask:
    return SubmitTask(pool=pool, target="tests.tasks:add", args=[i, i])


async def outbox_rows(rt: Runtime, task_ids: Sequence[str]) -> list[Outbox]:
    async with rt.sessions() as session:
        rows = await session.scalars(select(Outbox).where(Outbox.task_id.in_(task_ids)))
        return list(rows)


async def no_outbox_rows(rt: Runtime, task_ids: Sequence[str]) -> bool:
    return not await outbox_rows(rt, task_ids)


async def test_a_submitted_task_is_published_without_a_relay_round(
    rt: Runtime, direct: DirectPublisher, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    before = time.time()
    view, _ = await service.submit(rt, add(pool_name))
    [message] = await take_all(rt, pool_name, 1)
    assert [(t.task_id, t.attempt) for t in tasks_of(message)] == [(view.id, 1)]
    signing.Verifier(rt.public_keys).verify(
        message.body, (message.headers or {}).get(signing.SIGNATURE_HEADER)
    )
    await await_until(
        lambda: no_outbox_rows(rt, [view.id]), 10, "the published task's outbox row to go"
    )
    assert time.time() - before < LEASE, "published before the relay could have"


async def test_the_outbox_row_waits_for_the_lease_until_the_publish_is_confirmed(
    rt: Runtime, pool_name: str
) -> None:
    """Committed with its row due only after the lease: the relay leaves it alone while the
    direct publish is under way."""

    class Holds(DirectPublisher):
        held: list[Due]

        def offer(self, rows: Sequence[Due]) -> None:
            self.held = list(rows)

    await make_pool(rt, pool_name)
    async with running(rt, Holds(rt)) as publisher:
        before = time.time()
        view, _ = await service.submit(rt, add(pool_name))
        [row] = await outbox_rows(rt, [view.id])
        assert before + LEASE <= row.available_at <= time.time() + LEASE
        exchange = await rt.exchange(names.TASKS_EXCHANGE)
        while (await relay_once(rt, exchange))[0] >= BATCH_SIZE:
            pass  # other tests' rows share the database: relay until the due ones are out
        assert [row.id for row in await outbox_rows(rt, [view.id])] == [row.id], "not relayed"
        assert [due.id for due in publisher.held] == [view.id]


async def test_a_task_committed_by_a_dispatcher_that_died_before_publishing_is_relayed(
    rt: Runtime, pool_name: str
) -> None:
    """SIGKILL between the commit and the publish: the row falls due after its lease and the
    relay (of this dispatcher's successor, or of another replica) publishes the task."""

    class DiesAfterCommit(DirectPublisher):
        def offer(self, rows: Sequence[Due]) -> None:
            """Nothing: the process is gone before it publishes."""

    await make_pool(rt, pool_name)
    async with running(rt, DiesAfterCommit(rt), lease=0.5):
        ids = await service.submit_batch(rt, [add(pool_name, i) for i in range(3)])
    exchange = await rt.exchange(names.TASKS_EXCHANGE)

    async def relayed() -> bool:
        await relay_once(rt, exchange)
        return await no_outbox_rows(rt, ids)

    await await_until(relayed, 10, "the relay to publish the tasks once their lease ran out")
    taken = await take_all(rt, pool_name, 3)
    assert sorted(t.task_id for m in taken for t in tasks_of(m)) == sorted(ids)


async def test_a_failed_publish_leaves_the_task_to_the_relay_at_once(
    rt: Runtime, direct: DirectPublisher, pool_name: str
) -> None:
    """The pool's queue was deleted by hand: the unroutable publish makes the row due now,
    and the relay declares the queue again and publishes."""
    await make_pool(rt, pool_name)
    channel = await rt.connection.channel()
    await channel.queue_delete(names.pool_queue(pool_name))
    await channel.close()
    view, _ = await service.submit(rt, add(pool_name))

    async def due_now() -> bool:
        rows = await outbox_rows(rt, [view.id])
        return bool(rows) and rows[0].available_at <= time.time()

    await await_until(due_now, 10, "the unpublished row to be made due")
    exchange = await rt.exchange(names.TASKS_EXCHANGE)

    async def relayed() -> bool:
        await relay_once(rt, exchange)
        return await no_outbox_rows(rt, [view.id])

    await await_until(relayed, 10, "the relay to publish the task")
    [message] = await take_all(rt, pool_name, 1)
    assert [t.task_id for t in tasks_of(message)] == [view.id]


@pytest.mark.parametrize("limit", ["draining", "max_running"])
async def test_a_draining_or_limited_pool_is_left_to_the_relay(
    rt: Runtime, direct: DirectPublisher, pool_name: str, limit: str
) -> None:
    await make_pool(rt, pool_name)
    values = {"draining": True} if limit == "draining" else {"max_running": 5}
    async with rt.sessions.begin() as session:
        await session.execute(update(Pool).where(Pool.name == pool_name).values(**values))
    view, _ = await service.submit(rt, add(pool_name))
    [row] = await outbox_rows(rt, [view.id])
    assert row.available_at <= time.time(), "due at once, for the relay"
    channel = await rt.connection.channel()
    queue = await channel.get_queue(names.pool_queue(pool_name))
    assert queue.declaration_result.message_count == 0
    await channel.close()


async def test_a_burst_is_published_in_batches_for_agents_that_take_them(
    rt: Runtime, direct: DirectPublisher, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    await add_agent(rt, pool_name, minor=messages.PROTOCOL_MINOR, concurrency=4)
    async with rt.sessions() as session:
        await rt.batch_sizes.refresh(session)
    ids = await service.submit_batch(rt, [add(pool_name, i) for i in range(10)])
    taken = await take_all(rt, pool_name, 10)
    assert sorted(len(tasks_of(m)) for m in taken) == [2, 4, 4]
    assert sorted(t.task_id for m in taken for t in tasks_of(m)) == sorted(ids)
    await await_until(lambda: no_outbox_rows(rt, ids), 10, "the outbox rows to go")
    assert rt.metrics.attempts_published.labels(pool_name)._value.get() == 10


async def test_rows_beyond_the_in_flight_bound_are_left_to_the_relay(
    rt: Runtime, pool_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk submit faster than the broker does not pile its messages up in memory."""

    class SlowBroker(DirectPublisher):
        gate = anyio.Event()

        async def _publish(self, rows: list[Due]) -> None:
            await self.gate.wait()
            await super()._publish(rows)

    monkeypatch.setattr("rexec.dispatcher.direct.MAX_IN_FLIGHT", 3)
    await make_pool(rt, pool_name)
    async with running(rt, SlowBroker(rt)) as publisher:
        first = await service.submit_batch(rt, [add(pool_name, i) for i in range(3)])
        assert (publisher.in_flight, publisher.lease) == (3, 0), "full while those are sent"
        late, _ = await service.submit(rt, add(pool_name, 3))
        [row] = await outbox_rows(rt, [late.id])
        assert row.available_at <= time.time(), "due at once, for the relay"
        publisher.gate.set()
        taken = await take_all(rt, pool_name, 3)
        assert sorted(t.task_id for m in taken for t in tasks_of(m)) == sorted(first)

        async def sent() -> bool:
            return publisher.in_flight == 0

        await await_until(sent, 10, "the held publishes to be confirmed")
        assert publisher.lease == LEASE


async def test_without_a_direct_publisher_new_tasks_are_due_at_once(
    rt: Runtime, pool_name: str
) -> None:
    await make_pool(rt, pool_name)
    view, _ = await service.submit(rt, add(pool_name))
    [row] = await outbox_rows(rt, [view.id])
    assert row.available_at <= time.time()
