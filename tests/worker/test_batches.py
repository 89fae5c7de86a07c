"""Several tasks in one message (protocol 1.2): each runs as if it came alone, the delivery is
acked once all have started, and what cannot start is handed back as ``returned``."""

from __future__ import annotations

import anyio
import pytest

from rexec.schemas import messages, names
from rexec.schemas.settings import Settings
from rexec.worker.agent import Agent, prefetch_for
from tests.worker.harness import Broker, running_agent, task, until

pytestmark = pytest.mark.anyio


async def test_every_task_of_a_batch_runs_and_the_delivery_is_acked(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    tasks = [task(pool, "tests.tasks:add", args=[i, 1]) for i in range(4)]
    async with running_agent(broker, agent_settings, pool, concurrency=4) as agent:
        await broker.publish(pool, messages.TaskBatch(tasks=tasks))
        results = [await broker.terminal(t.task_id) for t in tasks]
        assert [(type(r), getattr(r, "result", None)) for r in results] == [
            (messages.Succeeded, i + 1) for i in range(4)
        ]
        assert (agent.stats.deliveries, agent.stats.received, agent.stats.started) == (1, 4, 4)
        assert await broker.ready(names.pool_queue(pool)) == [], "acked, not returned"


async def test_a_task_twice_in_one_batch_runs_once(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    once = task(pool)
    async with running_agent(broker, agent_settings, pool, concurrency=2) as agent:
        await broker.publish(pool, messages.TaskBatch(tasks=[once, once]))
        assert isinstance(await broker.terminal(once.task_id), messages.Succeeded)
        await until(lambda: agent.stats.duplicates == 1, 5, "the copy to be dropped")
        assert [type(e) for e in broker.of(once.task_id)] == [
            messages.Started,
            messages.Succeeded,
        ]


async def test_tasks_of_a_batch_that_wait_too_long_for_a_slot_are_returned(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    """A part of a message cannot be requeued: the agent reports it ``returned`` (the
    dispatcher publishes it again) and acks the delivery once the rest has started."""
    long = task(pool, "tests.tasks:sleep", args=[3.0])
    behind = [task(pool), task(pool)]
    async with running_agent(
        broker, agent_settings, pool, concurrency=1, pause_after=0.2, return_after=0.6
    ) as agent:
        await broker.publish(pool, messages.TaskBatch(tasks=[long, *behind]))
        await broker.wait_for(long.task_id, messages.Started)
        for waiting in behind:
            returned = await broker.wait_for(waiting.task_id, messages.Returned)
            assert (returned.attempt, returned.agent_id, returned.reason) == (
                1,
                agent.agent_id,
                "no_slot",
            )
            assert [type(e) for e in broker.of(waiting.task_id)] == [messages.Returned]
        await until(lambda: agent.stats.handed_back == 2, 5, "both counted as handed back")
        assert await broker.ready(names.pool_queue(pool)) == [], "the batch is acked"
        assert isinstance(await broker.terminal(long.task_id), messages.Succeeded)


async def test_drain_returns_the_waiting_tasks_of_a_batch(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    first = task(pool, "tests.tasks:sleep", args=[0.5])
    waiting = task(pool)
    async with anyio.create_task_group() as tg:
        agent = Agent(
            agent_settings,
            agent_id="drain-" + first.task_id[:8],
            pool=pool,
            allow=["tests.tasks:*"],
            concurrency=1,
            drain_timeout=10,
            pause_after=60,
        )
        await tg.start(agent.run)
        await broker.publish(pool, messages.TaskBatch(tasks=[first, waiting]))
        await broker.wait_for(first.task_id, messages.Started)
        await until(lambda: agent._parts.intake.waiting == 1, 5, "the second task to wait")
        with anyio.fail_after(20):
            await agent.shutdown()
    assert isinstance(await broker.terminal(first.task_id), messages.Succeeded)
    returned = await broker.wait_for(waiting.task_id, messages.Returned)
    assert returned.reason == "draining"
    assert await broker.ready(names.pool_queue(pool)) == []


@pytest.mark.parametrize(
    ("body", "signed", "reason"),
    [
        (b'{"v": 1, "tasks": []}', True, "carries no task"),
        (b'{"v": 1, "tasks": [{"v": 1}]}', True, "malformed task batch message"),
        (None, False, "refused"),
        ("other-pool", True, "reached the queue of pool"),
    ],
)
async def test_an_unusable_batch_is_dead_lettered_whole(
    broker: Broker,
    agent_settings: Settings,
    pool: str,
    body: bytes | str | None,
    signed: bool,
    reason: str,
) -> None:
    good = task(pool)
    if body is None or isinstance(body, str):
        stray = task(body) if isinstance(body, str) else task(pool)
        body = messages.encode(messages.TaskBatch(tasks=[good, stray]))
    async with running_agent(broker, agent_settings, pool) as agent:
        await broker.publish(pool, body, signed=signed, batch=True)
        [dead] = await broker.wait_dead_letters(pool)
        assert reason in str((dead.headers or {})[names.REASON_HEADER])
        assert dead.body == body
        assert agent.stats.started == 0
        assert broker.of(good.task_id) == []


def test_a_busy_agent_holds_a_few_batches_not_one_per_slot() -> None:
    assert [prefetch_for(c) for c in (1, 2, 4, 8, 16, 64)] == [1, 2, 2, 2, 4, 16]


async def test_behind_long_tasks_the_agent_leaves_later_batches_in_the_queue(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    """Concurrency 4 prefetches 2 deliveries: one batch running, two waiting at most (8 tasks),
    the rest ready for other agents (before batches a delivery held one task, so prefetch was
    one per slot)."""
    batches = [[task(pool, "tests.tasks:sleep", args=[30]) for _ in range(4)] for _ in range(5)]
    async with running_agent(broker, agent_settings, pool, concurrency=4, pause_after=60) as agent:
        for batch in batches:
            await broker.publish(pool, messages.TaskBatch(tasks=batch))
        for running in batches[0]:
            await broker.wait_for(running.task_id, messages.Started)
        await until(lambda: agent._parts.intake.waiting == 8, 5, "two batches to wait")
        ready = await broker.wait_ready(names.pool_queue(pool), 2)
        assert {t.task_id for body in ready for t in messages.decode_task_batch(body).tasks} == {
            t.task_id for batch in batches[3:] for t in batch
        }
