"""Least privilege enforced by the servers: an agent's credentials reach its own pool only.

Each test registers an agent through the real API, then logs in to the real RabbitMQ and
Redis with the credentials it was issued and tries what it must not do. The servers refuse:
not our client code, which an attacker holding the credentials would not run.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aiormq.exceptions
import anyio
import httpx
import pytest
import redis.asyncio as aredis
import redis.exceptions
from aio_pika.abc import AbstractConnection

from rexec.dispatcher import credentials
from rexec.dispatcher.db.models import Agent
from rexec.dispatcher.events import run_events
from rexec.dispatcher.runtime import Runtime
from rexec.dispatcher.watchdog import Watchdog
from rexec.schemas import messages, names
from rexec.schemas.api import AgentRegistered, ScopedCredentials
from rexec.worker.credentials import with_login
from tests.conftest import REDIS_URL
from tests.support import await_until

pytestmark = pytest.mark.anyio


async def register_scoped(api: httpx.AsyncClient, pool: str) -> tuple[str, AgentRegistered]:
    """A token for ``pool`` and an agent registered with it, as a 1.1 agent registers."""
    token = await api.post("/v1/tokens", json={"pool": pool})
    assert token.status_code == 201, token.text
    body = {
        "pool": pool,
        "hostname": "worker-7",
        "pid": 1,
        "concurrency": 2,
        "version": messages.PROTOCOL_VERSION,
        "protocol_minor": messages.PROTOCOL_MINOR,
    }
    response = await api.post(
        "/v1/agents/register",
        json=body,
        headers={"authorization": f"Bearer {token.json()['secret']}"},
    )
    assert response.status_code == 201, response.text
    import msgspec

    registered = msgspec.convert(response.json(), AgentRegistered)
    assert registered.credentials is not None, "a 1.1 agent gets credentials of its own"
    return str(token.json()["token"]["id"]), registered


def creds(registered: AgentRegistered) -> ScopedCredentials:
    assert registered.credentials is not None
    return registered.credentials


@asynccontextmanager
async def broker_as(
    runtime: Runtime, registered: AgentRegistered
) -> AsyncIterator[AbstractConnection]:
    login = creds(registered)
    url = with_login(runtime.settings.amqp_url, login.amqp_username, login.amqp_password)
    connection = await aio_pika.connect(url)
    try:
        yield connection
    finally:
        await connection.close()


def redis_as(registered: AgentRegistered) -> aredis.Redis:
    login = creds(registered)
    return aredis.Redis.from_url(with_login(REDIS_URL, login.redis_username, login.redis_password))


async def refused(action: Any, *errors: type[BaseException]) -> str:
    with pytest.raises(errors) as caught:
        await action
    return str(caught.value)


async def test_an_agent_reaches_only_its_own_pool_in_rabbitmq(
    api: httpx.AsyncClient, runtime: Runtime, pool: str, pool_name_b: str
) -> None:
    _, registered = await register_scoped(api, pool)
    async with broker_as(runtime, registered) as connection:
        own = await connection.channel()
        queue = await own.declare_queue(names.pool_queue(pool), passive=True)
        await queue.consume(lambda message: None)  # its own queue: allowed
        control = await own.declare_queue(names.agent_queue(registered.agent_id), passive=True)
        await control.consume(lambda message: None)

        other = await connection.channel()
        queue_b = await other.declare_queue(names.pool_queue(pool_name_b), passive=True)
        text = await refused(
            queue_b.consume(lambda m: None), aiormq.exceptions.ChannelAccessRefused
        )
        assert f"access to queue '{names.pool_queue(pool_name_b)}'" in text

        # It cannot inject tasks: no write on rexec.tasks.
        inject = await connection.channel(publisher_confirms=True)
        tasks = await inject.get_exchange(names.TASKS_EXCHANGE, ensure=False)
        text = await refused(
            tasks.publish(aio_pika.Message(b"{}"), routing_key=pool_name_b),
            aiormq.exceptions.ChannelAccessRefused,
        )
        assert f"exchange '{names.TASKS_EXCHANGE}'" in text

        # Nor configure anything, nor read another agent's control queue.
        config = await connection.channel()
        await refused(
            config.declare_queue("rexec.stolen", durable=True),
            aiormq.exceptions.ChannelAccessRefused,
        )

        # It cannot publish events as another broker user: the broker checks user_id.
        forge = await connection.channel(publisher_confirms=True)
        events = await forge.get_exchange(names.EVENTS_EXCHANGE, ensure=False)
        text = await refused(
            events.publish(aio_pika.Message(b"{}", user_id="rexec-agent-other"), routing_key=""),
            aiormq.exceptions.ChannelPreconditionFailed,
        )
        assert "user_id property set to 'rexec-agent-other'" in text


async def test_an_agent_writes_only_its_own_keys_in_redis(
    api: httpx.AsyncClient, runtime: Runtime, pool: str, pool_name_b: str
) -> None:
    _, registered = await register_scoped(api, pool)
    _, neighbour = await register_scoped(api, pool)
    keys = runtime.keys
    client = redis_as(registered)
    try:
        await client.set(keys.agent(registered.agent_id), "{}", px=3000)  # its own heartbeat
        await client.set(keys.lease(pool, "t1", 1), registered.agent_id)  # its pool's lease
        assert await client.exists(keys.agent(neighbour.agent_id)) == 0  # may read heartbeats
        assert (await client.time())[0] > 0  # the lease script's fencing token is Redis' clock
        no = redis.exceptions.NoPermissionError
        # It cannot forge a neighbour's heartbeat (that would keep a dead agent "alive")...
        await refused(client.set(keys.agent(neighbour.agent_id), "{}"), no)
        await refused(client.delete(keys.agent(neighbour.agent_id)), no)
        # ...nor touch another pool's leases or cancel markers, nor anything else.
        await refused(client.set(keys.lease(pool_name_b, "t1", 1), registered.agent_id), no)
        await refused(client.get(keys.lease(pool_name_b, "t1", 1)), no)
        await refused(client.set(keys.cancelled(pool, "t1"), "1"), no)
        await refused(client.execute_command("FLUSHALL"), no)
        await refused(client.execute_command("KEYS", "*"), no)
        await refused(client.execute_command("ACL", "SETUSER", "me", "on", "+@all"), no)
    finally:
        await client.aclose()
        await runtime.redis.delete(keys.agent(registered.agent_id), keys.lease(pool, "t1", 1))


async def test_revoking_the_token_cuts_the_agent_off(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    token_id, registered = await register_scoped(api, pool)
    login = creds(registered)
    url = with_login(runtime.settings.amqp_url, login.amqp_username, login.amqp_password)
    connection = await aio_pika.connect(
        url,
        client_properties={
            "connection_name": names.agent_connection_name(pool, registered.agent_id, "h")
        },
    )
    client = redis_as(registered)
    try:
        assert await client.set(runtime.keys.agent(registered.agent_id), "{}", px=3000)
        started = anyio.current_time()
        response = await api.delete(f"/v1/tokens/{token_id}")
        assert response.status_code == 200, response.text

        async def closed() -> bool:  # the broker closed it (CONNECTION_FORCED)
            return not connection.connected.is_set()

        await await_until(closed, 10, "the revoked agent's AMQP connection to be closed")
        assert anyio.current_time() - started < 10
        with pytest.raises(redis.exceptions.ConnectionError):  # DELUSER dropped it; AUTH fails
            await client.set(runtime.keys.agent(registered.agent_id), "{}", px=3000)
        with pytest.raises((aiormq.exceptions.AMQPError, RuntimeError)):  # "... closed"
            await connection.channel()
        with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
            await aio_pika.connect(url)
        async with runtime.sessions() as session:
            agent = await session.get(Agent, registered.agent_id)
            assert agent is not None and agent.credentials_withdrawn_at is not None
        # The keeper never brings a withdrawn user back.
        assert await credentials.keep_once(runtime) == 0
        users = {str(u) for u in await runtime.redis.acl_users()}
        assert login.redis_username not in users
    finally:
        await client.aclose()
        if not connection.is_closed:
            await connection.close()


async def test_redis_users_lost_by_redis_are_restored_by_the_keeper(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    """A restarted (or failed-over) Redis has no ACL users; live agents must get theirs back."""
    _, registered = await register_scoped(api, pool)
    login = creds(registered)
    await runtime.redis.acl_deluser(login.redis_username)  # what a restart does
    assert await credentials.keep_once(runtime) >= 1
    client = redis_as(registered)
    try:
        assert await client.set(runtime.keys.agent(registered.agent_id), "{}", px=3000)
    finally:
        await client.aclose()


async def test_events_for_another_agent_are_dead_lettered(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    _, liar = await register_scoped(api, pool)
    _, victim = await register_scoped(api, pool)
    forged = messages.EventBatch(
        events=[messages.Started(task_id="t-forged", attempt=1, agent_id=victim.agent_id, at=1.0)]
    )
    body = messages.encode(forged)
    before = runtime.metrics.stale_events.labels("forged")._value.get()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_events, runtime)
        async with broker_as(runtime, liar) as connection:
            channel = await connection.channel(publisher_confirms=True)
            events = await channel.get_exchange(names.EVENTS_EXCHANGE, ensure=False)
            user = creds(liar).amqp_username
            await events.publish(aio_pika.Message(body, user_id=user), routing_key="")
        admin = await runtime.connection.channel()
        dead = await admin.declare_queue(
            names.dead_queue(names.DEAD_EVENTS_ROUTING_KEY), passive=True
        )

        async def dead_lettered() -> str | None:
            while (message := await dead.get(no_ack=True, fail=False)) is not None:
                if message.body == body:
                    return str((message.headers or {})[names.REASON_HEADER])
            return None

        reason = await await_until(dead_lettered, 10, "the forged batch in rexec.dead.events")
        tg.cancel_scope.cancel()
    assert f"events of agent {victim.agent_id} published by {user!r}" in reason
    assert "one agent cannot report for another" in reason
    assert runtime.metrics.stale_events.labels("forged")._value.get() == before + 1


async def judge_lost(runtime: Runtime, agent_id: str, registered_ago: float) -> None:
    """The watchdog judges the agent lost now; it registered (and was last seen)
    ``registered_ago`` seconds earlier."""
    async with runtime.sessions.begin() as session:
        agent = await session.get(Agent, agent_id)
        assert agent is not None
        agent.registered_at = agent.last_seen_at = time.time() - registered_ago
    watchdog = Watchdog(runtime)
    assert await watchdog.lease.acquire()
    await watchdog.agent_lost(agent_id)
    async with runtime.sessions() as session:
        agent = await session.get(Agent, agent_id)
        assert agent is not None and agent.state == "lost"


async def withdrawn(runtime: Runtime, agent_id: str) -> bool:
    async with runtime.sessions() as session:
        agent = await session.get(Agent, agent_id)
        assert agent is not None
        return agent.credentials_withdrawn_at is not None


async def test_a_lost_agent_keeps_its_credentials_for_the_window_from_when_it_was_judged_lost(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    """A hung agent that registered two hours ago and is judged lost now must still reach
    Redis when it wakes up (to find its leases taken and stop its attempts): the keep window
    counts from the judgement, not from its registration or its last ``online`` event."""
    _, registered = await register_scoped(api, pool)
    login = creds(registered)
    await judge_lost(runtime, registered.agent_id, registered_ago=2 * credentials.LOST_AGENT_KEEP)

    await credentials.keep_once(runtime)
    assert not await withdrawn(runtime, registered.agent_id), "withdrawn at once"
    client = redis_as(registered)
    try:
        assert await client.set(runtime.keys.agent(registered.agent_id), "{}", px=3000)
        await client.delete(runtime.keys.agent(registered.agent_id))
    finally:
        await client.aclose()

    # The window ends: LOST_AGENT_KEEP after the judgement, the keeper retires them.
    async with runtime.sessions.begin() as session:
        agent = await session.get(Agent, registered.agent_id)
        assert agent is not None and agent.lost_at is not None
        agent.lost_at -= credentials.LOST_AGENT_KEEP + 1
    await credentials.keep_once(runtime)
    assert await withdrawn(runtime, registered.agent_id), "retired once the window passed"
    assert login.redis_username not in {str(u) for u in await runtime.redis.acl_users()}


async def test_a_lost_agent_heartbeating_again_keeps_its_credentials_past_the_window(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    """Judged lost, then woken up and heartbeating again: it is not retired while it lives."""
    _, registered = await register_scoped(api, pool)
    await judge_lost(runtime, registered.agent_id, registered_ago=10.0)
    async with runtime.sessions.begin() as session:
        agent = await session.get(Agent, registered.agent_id)
        assert agent is not None and agent.lost_at is not None
        agent.lost_at -= credentials.LOST_AGENT_KEEP + 1
    client = redis_as(registered)
    try:
        assert await client.set(runtime.keys.agent(registered.agent_id), "{}", px=5000)
        await credentials.keep_once(runtime)
        assert not await withdrawn(runtime, registered.agent_id)
    finally:
        await client.aclose()
        await runtime.redis.delete(runtime.keys.agent(registered.agent_id))
