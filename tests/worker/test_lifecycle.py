"""Intake and shutdown: started is confirmed before the ack, the drain hands back what it
cannot finish, and intake pauses instead of hoarding deliveries behind long tasks."""

from __future__ import annotations

import json
from urllib.parse import quote

import aiormq.exceptions
import anyio
import httpx
import pytest
import redis
from aio_pika.abc import AbstractIncomingMessage

from rexec.schemas import messages, names
from rexec.schemas.names import RedisKeys
from rexec.schemas.settings import Settings
from rexec.worker import delivery
from rexec.worker.agent import Agent, AgentError
from rexec.worker.events import EventPublisher
from tests.conftest import MANAGEMENT_URL
from tests.support import await_until
from tests.worker.harness import Broker, running_agent, task, until

pytestmark = pytest.mark.anyio


def record_confirms_and_acks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The order in which the broker confirmed task events and the agent acked deliveries."""
    order: list[tuple[str, str]] = []
    real_emit, real_ack = EventPublisher.emit, delivery.ack

    async def recording_emit(publisher: EventPublisher, event: messages.Event) -> None:
        await real_emit(publisher, event)
        if isinstance(event, messages.TaskEvent):
            order.append((f"confirmed {type(event).__name__}", event.task_id))

    async def recording_ack(message: AbstractIncomingMessage, agent_id: str) -> None:
        order.append(("ack", messages.decode_task(message.body).task_id))
        await real_ack(message, agent_id)

    monkeypatch.setattr(EventPublisher, "emit", recording_emit)
    monkeypatch.setattr(delivery, "ack", recording_ack)
    return order


async def test_started_is_confirmed_before_the_delivery_is_acked(
    broker: Broker, agent_settings: Settings, pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = record_confirms_and_acks(monkeypatch)
    async with running_agent(broker, agent_settings, pool):
        message = task(pool, "tests.tasks:sleep", args=[0.2])
        assert isinstance(await broker.run(pool, message), messages.Succeeded)
        order = [what for what, task_id in recorded if task_id == message.task_id]
        assert order == ["confirmed Started", "ack", "confirmed Succeeded"]


async def test_delivery_is_not_held_while_the_task_runs(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    """A running task's delivery is already acked: losing the channel returns nothing to the
    queue, and the result is still reported once the channel is back."""
    async with running_agent(broker, agent_settings, pool) as agent:
        message = task(pool, "tests.tasks:sleep", args=[1.0])
        await broker.publish(pool, message)
        await broker.wait_for(message.task_id, messages.Started)
        # The broker closes the agent's channel (as on a channel error); the robust channel
        # reopens. Unacked deliveries would go back to the queue now.
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await agent._parts.channel.declare_queue("rexec.no-such-queue", passive=True)
        assert await broker.ready(names.pool_queue(pool)) == []
        assert isinstance(await broker.terminal(message.task_id), messages.Succeeded)
        assert isinstance(await broker.run(pool, task(pool)), messages.Succeeded)


async def test_drain_finishes_what_it_can_and_hands_back_the_rest(
    broker: Broker, agent_settings: Settings, pool: str, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    quick = task(pool, "tests.tasks:sleep", args=[0.3])
    slow = task(pool, "tests.tasks:sleep", args=[30])
    waiting = task(pool)
    async with anyio.create_task_group() as tg:
        agent = Agent(
            agent_settings,
            agent_id="drain-" + quick.task_id[:8],
            pool=pool,
            allow=["tests.tasks:*"],
            concurrency=2,
            drain_timeout=1.5,
            pause_after=60,
        )
        await tg.start(agent.run)
        await broker.publish(pool, quick)
        await broker.publish(pool, slow)
        await broker.wait_for(quick.task_id, messages.Started)
        await broker.wait_for(slow.task_id, messages.Started)
        await broker.publish(pool, waiting)  # delivered, but no slot is free
        await until(lambda: agent._parts.intake.waiting == 1, 5, "the third delivery to wait")
        with anyio.fail_after(10):
            await agent.shutdown()  # what SIGTERM does in rexec-agent
    assert isinstance(await broker.terminal(quick.task_id), messages.Succeeded)
    handed_back = await broker.terminal(slow.task_id)
    assert isinstance(handed_back, messages.Failed)
    assert (handed_back.error_type, handed_back.retryable) == ("AgentShutdown", True)
    # Reported returned and acked (the dispatcher publishes it again), not requeued: a
    # requeue would spend the pool queue's delivery limit.
    [back] = broker.of(waiting.task_id)
    assert isinstance(back, messages.Returned) and back.reason == "draining"
    assert await broker.ready(names.pool_queue(pool)) == []
    assert agent.stats.handed_back == 1

    async def offline() -> bool:
        return any(
            isinstance(e, messages.AgentOffline) and e.agent_id == agent.agent_id
            for e in broker.events
        )

    await await_until(offline, 5, "agent_offline")
    # Marked stopped, not deleted: the dispatcher deletes it once it applied the offline event.
    stopped = json.loads(redis_client.get(keys.agent(agent.agent_id)) or "{}")
    assert stopped["state"] == "stopped"
    assert redis_client.pttl(keys.agent(agent.agent_id)) > 60_000
    assert agent.running == 0


async def test_intake_pauses_and_hands_back_deliveries_behind_long_tasks(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    long = task(pool, "tests.tasks:sleep", args=[2.0])
    queued = task(pool)
    async with running_agent(
        broker, agent_settings, pool, concurrency=1, pause_after=0.2, return_after=0.6
    ) as agent:
        await broker.publish(pool, long)
        await broker.wait_for(long.task_id, messages.Started)
        await broker.publish(pool, queued)
        await until(lambda: agent._parts.intake.pauses == 1, 5, "intake to pause")
        await until(lambda: agent.stats.handed_back == 1, 5, "the waiting delivery handed back")
        back = await broker.wait_for(queued.task_id, messages.Returned)
        assert back.reason == "no_slot"
        assert await broker.ready(names.pool_queue(pool)) == []  # acked, not requeued
        assert isinstance(await broker.terminal(long.task_id), messages.Succeeded)
        await broker.publish(pool, queued)  # what the dispatcher does with a returned attempt
        assert isinstance(await broker.terminal(queued.task_id), messages.Succeeded)


async def test_missing_pool_queue_is_a_clear_error(
    broker: Broker, agent_settings: Settings
) -> None:
    agent = Agent(agent_settings, agent_id="lonely", pool="no-such-pool", allow=["x:*"])
    with pytest.raises(AgentError, match=r"queue rexec\.pool\.no-such-pool does not exist"):
        await agent.run()


async def test_connection_killed_mid_task_loses_nothing(
    broker: Broker, agent_settings: Settings, pool: str, vhost: str
) -> None:
    """The dispatcher's watchdog (or a broker restart) closes the agent's connection while a
    task runs: the agent reconnects, reports the result, and keeps consuming."""
    async with running_agent(broker, agent_settings, pool) as agent:
        message = task(pool, "tests.tasks:sleep", args=[1.0])
        await broker.publish(pool, message)
        await broker.wait_for(message.task_id, messages.Started)
        expected = names.agent_connection_name(pool, agent.agent_id, agent.hostname)
        async with httpx.AsyncClient(
            base_url=MANAGEMENT_URL, auth=("guest", "guest"), timeout=10
        ) as api:

            async def connection() -> str | None:
                response = await api.get(f"/api/vhosts/{quote(vhost, safe='')}/connections")
                for conn in response.json():
                    if conn.get("client_properties", {}).get("connection_name") == expected:
                        return str(conn["name"])
                return None

            name = await await_until(connection, 15, f"connection {expected!r} to be listed")
            assert name is not None
            response = await api.delete(f"/api/connections/{quote(name, safe='')}")
            assert response.status_code in (200, 204)
        assert isinstance(await broker.terminal(message.task_id, within=20), messages.Succeeded)
        assert isinstance(await broker.run(pool, task(pool)), messages.Succeeded)
        assert [type(e) for e in broker.of(message.task_id)] == [
            messages.Started,
            messages.Succeeded,
        ]
