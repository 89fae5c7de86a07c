"""Scoped credentials: a RabbitMQ user and a Redis ACL user for each agent, limited to its pool.

The servers enforce them, not our client code: an agent's broker user may read only its
pool's queue and its own control queue and write only events and dead letters; its Redis user
may write only its own heartbeat and lease set and its pool's leases. Withdrawing them (token
revoked, agent gone) closes the agent's connections and refuses new ones.

Redis forgets ACL users when it restarts or fails over to a replica (ACLs are not replicated),
so the keeper re-creates the live agents' users from the password hashes kept in the database;
the agents' clients re-authenticate when they reconnect.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import anyio
from redis.exceptions import RedisError
from sqlalchemy import func, or_, select

from rexec.schemas.api import ScopedCredentials

from .backoff import Backoff
from .db.models import Agent
from .management import Management, ManagementError
from .outages import LoopHealth, database_outage
from .runtime import Runtime

log = logging.getLogger("rexec.credentials")

LOST_AGENT_KEEP = 3600.0
"""Seconds a lost agent keeps its credentials, counted from when the watchdog judged it lost
(``Agent.lost_at``): a hung agent that wakes up must still reach Redis and its control queue
to learn that its attempts were taken over, and stop them. One that heartbeats again keeps
them past the window."""


class CredentialsError(Exception):
    """Credentials could not be issued; the text says which server refused and why."""


def _sha256(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


async def issue(rt: Runtime, agent: Agent) -> ScopedCredentials:
    """Create the agent's users (and store what is needed to withdraw or restore them)."""
    broker_password = secrets.token_urlsafe(24)
    redis_password = secrets.token_urlsafe(24)
    try:
        agent.broker_user = await Management(rt.settings).create_agent_user(
            agent.pool, agent.id, broker_password
        )
    except ManagementError as exc:
        raise CredentialsError(f"cannot create the agent's RabbitMQ user: {exc}") from None
    agent.redis_user = rt.keys.acl_user(agent.id)
    agent.redis_password_hash = _sha256(redis_password)
    try:
        await _set_redis_user(rt, agent)
    except (RedisError, OSError) as exc:
        await _delete_broker_user(rt, agent)
        raise CredentialsError(
            f"cannot create the agent's Redis ACL user: {exc}; the dispatcher's Redis user "
            "needs the ACL command (or set REXEC_AGENT_CREDENTIALS=shared)"
        ) from None
    return ScopedCredentials(
        amqp_username=agent.broker_user,
        amqp_password=broker_password,
        redis_username=agent.redis_user,
        redis_password=redis_password,
    )


async def _set_redis_user(rt: Runtime, agent: Agent) -> None:
    assert agent.redis_user is not None and agent.redis_password_hash is not None
    await _acl(
        rt,
        "SETUSER",
        agent.redis_user,
        "reset",
        "on",
        f"#{agent.redis_password_hash}",
        *rt.keys.agent_acl_rules(agent.pool, agent.id),
    )


async def _delete_broker_user(rt: Runtime, agent: Agent) -> None:
    if agent.broker_user:
        try:
            await Management(rt.settings).delete_user(agent.broker_user)
        except ManagementError as exc:
            log.warning(
                "could not delete the agent's RabbitMQ user",
                extra={"agent_id": agent.id, "error": str(exc)},
            )


async def withdraw(rt: Runtime, agent_ids: Iterable[str], reason: str) -> list[str]:
    """Delete the agents' users; return the agents whose credentials this call withdrew.

    The withdrawal is committed before the users are deleted, so the keeper, which re-checks
    after restoring a user, can never bring one back. Deleting the users disconnects their
    clients at once: Redis and RabbitMQ both close the connections of a deleted user."""
    wanted = list(agent_ids)
    if not wanted:
        return []
    async with rt.sessions.begin() as session:
        agents = list(
            await session.scalars(
                select(Agent).where(
                    Agent.id.in_(wanted),
                    Agent.credentials_withdrawn_at.is_(None),
                    or_(Agent.broker_user.is_not(None), Agent.redis_user.is_not(None)),
                )
            )
        )
        for agent in agents:
            agent.credentials_withdrawn_at = time.time()
    for agent in agents:
        await _delete_redis_user(rt, agent.id, agent.redis_user)
        await _delete_broker_user(rt, agent)
        log.info("agent credentials withdrawn", extra={"agent_id": agent.id, "reason": reason})
    return [agent.id for agent in agents]


async def _delete_redis_user(rt: Runtime, agent_id: str, user: str | None) -> None:
    if not user:
        return
    try:
        await _acl(rt, "DELUSER", user)
    except (RedisError, OSError) as exc:
        log.warning(
            "could not delete the agent's Redis user (Redis unreachable?); a restarted Redis "
            "will not have it, and the keeper does not restore withdrawn users",
            extra={"agent_id": agent_id, "error": str(exc)},
        )


async def keep(rt: Runtime) -> None:
    """Forever: re-create the Redis users Redis lost, and retire those of long-lost agents."""
    interval = rt.settings.watchdog_interval
    health = LoopHealth("credential keeper", log, Backoff(base=interval, cap=max(interval, 5.0)))
    while True:
        try:
            await keep_once(rt)
        except (RedisError, OSError) as exc:
            if database_outage(exc):
                await health.wait(exc)
                continue
            log.debug("credential keeper: Redis unreachable", extra={"error": str(exc)})
        except Exception as exc:
            await health.wait(exc)
            continue
        else:
            health.ok()
        await anyio.sleep(interval)


async def keep_once(rt: Runtime) -> int:
    """One pass of the keeper; returns how many Redis users it re-created."""
    now = time.time()
    # Agents judged lost before ``lost_at`` existed count from when they were last seen.
    lost_since = func.coalesce(Agent.lost_at, Agent.last_seen_at, Agent.registered_at)
    async with rt.sessions.begin() as session:
        active = list(
            await session.scalars(
                select(Agent).where(
                    Agent.redis_user.is_not(None),
                    Agent.credentials_withdrawn_at.is_(None),
                    or_(Agent.state != "lost", lost_since > now - LOST_AGENT_KEEP),
                )
            )
        )
        retired = await session.scalars(
            select(Agent.id).where(
                Agent.redis_user.is_not(None),
                Agent.credentials_withdrawn_at.is_(None),
                Agent.state == "lost",
                lost_since <= now - LOST_AGENT_KEEP,
            )
        )
        retired_ids = list(retired)
    await withdraw(rt, await _still_silent(rt, retired_ids), "agent lost for an hour")
    if not active:
        return 0
    present = {_text(u) for u in await _acl(rt, "USERS")}
    restored = [agent for agent in active if agent.redis_user not in present]
    for agent in restored:
        await _set_redis_user(rt, agent)
    if not restored:
        return 0
    # A withdrawal committed meanwhile must win: delete what it deleted before we restored it.
    async with rt.sessions() as session:
        withdrawn = await session.execute(
            select(Agent.id, Agent.redis_user).where(
                Agent.id.in_([a.id for a in restored]),
                Agent.credentials_withdrawn_at.is_not(None),
            )
        )
        for agent_id, user in withdrawn:
            await _delete_redis_user(rt, agent_id, user)
    log.warning("re-created agents' Redis users that Redis lost", extra={"count": len(restored)})
    return len(restored)


async def _still_silent(rt: Runtime, agent_ids: list[str]) -> list[str]:
    """The agents without a heartbeat key: one judged lost that woke up and heartbeats
    again is alive, and keeps its credentials. Raises while Redis is away: no judgement."""
    if not agent_ids:
        return []
    async with rt.redis.pipeline(transaction=False) as pipe:
        for agent_id in agent_ids:
            pipe.exists(rt.keys.agent(agent_id))
        alive = await pipe.execute()
    return [agent_id for agent_id, beats in zip(agent_ids, alive, strict=True) if not beats]


async def _acl(rt: Runtime, *args: str) -> Any:
    """One ``ACL`` subcommand (redis-py's ``acl_*`` helpers are not typed for asyncio)."""
    execute = cast(Callable[..., Awaitable[Any]], rt.redis.execute_command)
    return await execute("ACL", *args)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
