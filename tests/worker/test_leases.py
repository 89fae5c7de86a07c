"""Claims and leases: duplicates run once, cancel markers prevent starts, dead holders are taken
over, and an attempt whose lease another agent took is stopped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest
import redis

from rexec.schemas import messages
from rexec.schemas.names import LEASE_TOMBSTONE, RedisKeys
from rexec.schemas.settings import Settings
from rexec.worker.leases import member
from tests.worker.harness import Broker, alive, running_agent, task, until

pytestmark = pytest.mark.anyio


async def test_duplicate_delivery_runs_once(
    broker: Broker, agent_settings: Settings, pool: str, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    async with running_agent(broker, agent_settings, pool, concurrency=2) as agent:
        message = task(pool, "tests.tasks:sleep", args=[0.5])
        await broker.publish(pool, message)
        await broker.publish(pool, message)  # a relay replay while the first copy runs
        event = await broker.terminal(message.task_id)
        assert isinstance(event, messages.Succeeded)
        await until(lambda: agent.stats.duplicates == 1, 5, "the running duplicate dropped")
        await broker.publish(pool, message)  # a late redelivery after it finished
        await until(lambda: agent.stats.duplicates == 2, 5, "the late duplicate dropped")
        # A marker task's result arrives after anything the duplicates could have emitted.
        assert isinstance(await broker.run(pool, task(pool)), messages.Succeeded)
        kinds = [type(e) for e in broker.of(message.task_id)]
        assert kinds == [messages.Started, messages.Succeeded]
        assert agent.stats.started == 2
        # The released lease lingers, short-lived, so late duplicates are still recognised.
        lease = keys.lease(pool, message.task_id, 1)
        assert redis_client.get(lease) == f"released:{agent.agent_id}"
        assert 0 < redis_client.ttl(lease) <= 600
        assert not redis_client.sismember(
            keys.agent_leases(agent.agent_id), member(message.task_id, 1)
        )


async def test_a_late_duplicate_of_a_finished_attempt_never_runs_after_its_agent_is_gone(
    broker: Broker, agent_settings: Settings, pool: str, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    """Item 9 of issue 20: a released lease guarded only while its agent lived (a dead
    holder's lease is taken over), so a relay replay delivered after the agent that ran the
    attempt had gone ran it a second time."""
    message = task(pool, "tests.tasks:add", args=[1, 2])
    async with running_agent(broker, agent_settings, pool) as first:
        assert isinstance(await broker.run(pool, message), messages.Succeeded)
    redis_client.delete(keys.agent(first.agent_id))  # gone, as after its TTL
    async with running_agent(broker, agent_settings, pool) as second:
        await broker.publish(pool, message)  # the replay
        await until(lambda: second.stats.duplicates == 1, 10, "the replay dropped")
        assert second.stats.started == 0
    assert [type(e) for e in broker.of(message.task_id)] == [messages.Started, messages.Succeeded]


async def test_a_claim_whose_reply_was_lost_still_runs(
    broker: Broker, agent_settings: Settings, pool: str, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    """The claim ran in Redis but its reply was lost (a timeout, a failover) and was sent
    again: the lease is already this agent's. That is not a duplicate; dropping it would lose
    the task (its delivery acked, nothing ever started)."""
    async with running_agent(broker, agent_settings, pool) as agent:
        message = task(pool)
        redis_client.set(keys.lease(pool, message.task_id, 1), agent.agent_id, ex=60)
        redis_client.sadd(keys.agent_leases(agent.agent_id), member(message.task_id, 1))
        event = await broker.run(pool, message)
        assert isinstance(event, messages.Succeeded)
        assert agent.stats.duplicates == 0
        await broker.publish(pool, message)  # a real duplicate after it finished
        await until(lambda: agent.stats.duplicates == 1, 5, "the late duplicate dropped")
        assert [type(e) for e in broker.of(message.task_id)] == [
            messages.Started,
            messages.Succeeded,
        ]


async def test_cancel_marker_prevents_start(
    broker: Broker, agent_settings: Settings, pool: str, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    async with running_agent(broker, agent_settings, pool) as agent:
        message = task(pool)
        redis_client.set(keys.cancelled(pool, message.task_id), "1", ex=60)
        await broker.publish(pool, message)
        await until(lambda: agent.stats.cancelled_before_start == 1, 5, "the cancelled drop")
        assert isinstance(await broker.run(pool, task(pool)), messages.Succeeded)
        assert broker.of(message.task_id) == []
        assert redis_client.get(keys.lease(pool, message.task_id, 1)) is None


async def test_lease_of_a_dead_agent_is_taken_over(
    broker: Broker, agent_settings: Settings, pool: str, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    async with running_agent(broker, agent_settings, pool) as agent:
        message = task(pool)
        redis_client.set(keys.lease(pool, message.task_id, 1), "dead-agent", ex=60)
        before = redis_client.time()
        event = await broker.run(pool, message)
        assert isinstance(event, messages.Succeeded)
        assert event.agent_id == agent.agent_id
        # The claim's fencing token, Redis' clock at the claim, on its started and its end.
        started = await broker.wait_for(message.task_id, messages.Started)
        assert started.fence == event.fence >= before[0] * 1_000_000 + before[1]


async def test_lease_of_a_live_agent_is_a_duplicate(
    broker: Broker, agent_settings: Settings, pool: str, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    async with running_agent(broker, agent_settings, pool) as agent:
        message = task(pool)
        redis_client.set(keys.lease(pool, message.task_id, 1), "live-agent", ex=60)
        redis_client.set(keys.agent("live-agent"), "{}", ex=60)
        await broker.publish(pool, message)
        await until(lambda: agent.stats.duplicates == 1, 5, "the duplicate dropped")
        assert redis_client.get(keys.lease(pool, message.task_id, 1)) == "live-agent"
        # The holder may have died before its started reached the broker: the dispatcher is
        # told, so the task is not stranded (it ignores this once the holder's start lands).
        returned = await broker.wait_for(message.task_id, messages.Returned)
        assert (returned.reason, returned.agent_id) == (messages.HELD_ELSEWHERE, agent.agent_id)
        assert agent.stats.started == 0


async def test_an_attempt_the_watchdog_ended_is_never_claimed_again(
    broker: Broker, agent_settings: Settings, pool: str, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    """A redelivery of an attempt the watchdog already requeued as the next one (a hung
    agent's unacked batch, returned when its connection is closed) must not run."""
    async with running_agent(broker, agent_settings, pool) as agent:
        message = task(pool)
        redis_client.set(keys.lease(pool, message.task_id, 1), LEASE_TOMBSTONE, ex=60)
        await broker.publish(pool, message)
        await until(lambda: agent.stats.duplicates == 1, 5, "the ended attempt dropped")
        assert agent.stats.started == 0
        assert broker.of(message.task_id) == []
        assert redis_client.get(keys.lease(pool, message.task_id, 1)) == LEASE_TOMBSTONE


async def test_heartbeat_key_describes_the_agent(
    broker: Broker, agent_settings: Settings, pool: str, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    async with running_agent(broker, agent_settings, pool) as agent:
        raw = redis_client.get(keys.agent(agent.agent_id))
        assert raw is not None
        beat = json.loads(raw)
        assert beat["pool"] == pool
        assert beat["pid"] == os.getpid()
        assert beat["running"] == 0
        assert {"hostname", "at"} <= beat.keys()
        assert 0 < redis_client.pttl(keys.agent(agent.agent_id)) <= 3000
    # Stopped: marked, for the dispatcher to delete after the agent's last events.
    assert json.loads(redis_client.get(keys.agent(agent.agent_id)) or "{}")["state"] == "stopped"


async def test_lost_leases_are_recreated(
    broker: Broker,
    agent_settings: Settings,
    pool: str,
    redis_client: redis.Redis,
    keys: RedisKeys,
) -> None:
    """Redis restarted and lost every key: the next beat re-asserts the running attempt."""
    fast = _with_ttl(agent_settings, 0.6)
    async with running_agent(broker, fast, pool) as agent:
        message = task(pool, "tests.tasks:sleep", args=[30])
        await broker.publish(pool, message)
        await broker.wait_for(message.task_id, messages.Started)
        lease = keys.lease(pool, message.task_id, 1)
        redis_client.delete(lease, keys.agent_leases(agent.agent_id), keys.agent(agent.agent_id))
        await until(lambda: redis_client.get(lease) == agent.agent_id, 5, "the lease recreated")
        assert redis_client.sismember(keys.agent_leases(agent.agent_id), member(message.task_id, 1))
        assert redis_client.exists(keys.agent(agent.agent_id))
        assert agent.running == 1


async def test_attempt_whose_lease_was_taken_over_is_stopped(
    broker: Broker,
    agent_settings: Settings,
    pool: str,
    redis_client: redis.Redis,
    keys: RedisKeys,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fast = _with_ttl(agent_settings, 0.6)
    pidfile = tmp_path / "pid"
    async with running_agent(broker, fast, pool) as agent:
        message = task(pool, "tests.tasks:write_pid", args=[str(pidfile), 30])
        await broker.publish(pool, message)
        await broker.wait_for(message.task_id, messages.Started)
        await until(pidfile.exists, 5, "the task to start")
        child = int(pidfile.read_text())
        # The watchdog presumed this agent dead and another agent took the attempt over.
        redis_client.set(keys.agent("usurper"), "{}", ex=60)
        redis_client.set(keys.lease(pool, message.task_id, 1), "usurper", ex=60)
        await until(lambda: agent.stats.leases_lost == 1, 5, "the attempt to be stopped")
        await until(lambda: not alive(child), 5, "the child to be killed")
        await until(lambda: agent.running == 0, 5, "the attempt to end")
        assert isinstance(await broker.run(pool, task(pool)), messages.Succeeded)
        assert [type(e) for e in broker.of(message.task_id)] == [messages.Started]
        assert redis_client.get(keys.lease(pool, message.task_id, 1)) == "usurper"
    logged = [r.getMessage() for r in caplog.records]
    expected = f"lease for task {message.task_id} attempt 1 was taken over by usurper"
    assert any(expected in line and "stopped the attempt" in line for line in logged)


def _with_ttl(settings: Settings, ttl: float) -> Settings:
    return msgspec.structs.replace(settings, heartbeat_ttl=ttl)
