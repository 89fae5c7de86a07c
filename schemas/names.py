"""Names an operator sees in RabbitMQ's dashboard and in Redis, in one place."""

from __future__ import annotations

import re

TASKS_EXCHANGE = "rexec.tasks"
EVENTS_EXCHANGE = "rexec.events"
EVENTS_QUEUE = "rexec.events"
CONTROL_EXCHANGE = "rexec.control"
DEAD_EXCHANGE = "rexec.dead"
DEAD_EVENTS_ROUTING_KEY = "events"

POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

REASON_HEADER = "x-rexec-reason"
"""Header that says why a message was dead-lettered by rexec (rather than by the broker)."""
DEAD_LETTER_AGENT_HEADER = "x-rexec-agent"
"""Header naming the agent that dead-lettered a task message."""


def pool_queue(pool: str) -> str:
    return f"rexec.pool.{pool}"


def dead_queue(routing_key: str) -> str:
    return f"rexec.dead.{routing_key}"


def agent_queue(agent_id: str) -> str:
    return f"rexec.agent.{agent_id}"


def agent_connection_name(pool: str, agent_id: str, host: str) -> str:
    return f"rexec-agent {pool}/{agent_id}@{host}"


def dispatcher_connection_name(host: str) -> str:
    return f"rexec-dispatcher@{host}"


AGENT_USER_PREFIX = "rexec-agent-"
"""RabbitMQ users the dispatcher issues to agents are ``rexec-agent-<agent-id>``."""


def agent_broker_user(agent_id: str) -> str:
    return f"{AGENT_USER_PREFIX}{agent_id}"


def agent_of_broker_user(user: str) -> str | None:
    """The agent a broker user was issued to, or None for any other user (an operator's)."""
    return user[len(AGENT_USER_PREFIX) :] if user.startswith(AGENT_USER_PREFIX) else None


LEASE_TOMBSTONE = "watchdog"
"""The holder the watchdog writes on the lease of an attempt it ended: never claimed again."""
LEASE_RELEASED = "released:"
"""Prefix of the holder an agent writes on the lease of an attempt it finished (``released:``
and its id): never claimed again, whether that agent still lives or not."""


class RedisKeys:
    """Redis key layout under one prefix (``rexec`` unless tests isolate themselves)."""

    def __init__(self, prefix: str = "rexec") -> None:
        self.prefix = prefix

    def agent(self, agent_id: str) -> str:
        """Heartbeat key: exists while the agent is alive (``SET ... EX ttl``)."""
        return f"{self.prefix}:agent:{agent_id}"

    def agent_leases(self, agent_id: str) -> str:
        """Set of ``task:attempt`` leases the agent holds, so it can re-assert them."""
        return f"{self.prefix}:agent:{agent_id}:leases"

    def lease(self, pool: str, task_id: str, attempt: int) -> str:
        """Who runs that attempt (an agent id, or ``LEASE_TOMBSTONE``). Under the pool, so an
        agent's Redis user reaches its pool's leases only."""
        return f"{self.prefix}:lease:{pool}:{task_id}:{attempt}"

    def cancelled(self, pool: str, task_id: str) -> str:
        """Marker checked by the claim script so a cancelled task never starts."""
        return f"{self.prefix}:cancelled:{pool}:{task_id}"

    def agents_pattern(self) -> str:
        return f"{self.prefix}:agent:*"

    def acl_user(self, agent_id: str) -> str:
        """The Redis ACL user issued to an agent (under the prefix, so test runs stay apart)."""
        return f"{self.prefix}-agent-{agent_id}"

    def agent_acl_rules(self, pool: str, agent_id: str) -> list[str]:
        """What an agent's Redis user may do: write its own heartbeat and lease set and its
        pool's leases, read other heartbeats (a claim checks the holder is dead) and its
        pool's cancel markers, run the lease scripts. Scripts are checked key by key too."""
        return [
            f"~{self.agent(agent_id)}",
            f"~{self.agent_leases(agent_id)}",
            f"~{self.prefix}:lease:{pool}:*",
            f"%R~{self.agents_pattern()}",
            f"%R~{self.prefix}:cancelled:{pool}:*",
            "resetchannels",
            "-@all",
            "+@connection",
            "+get",
            "+set",
            "+del",
            "+exists",
            "+expire",
            "+sadd",
            "+srem",
            "+evalsha",
            "+eval",
            "+time",  # the lease script's fencing token
            "+script|load",
        ]


def validate_pool_name(pool: str) -> str:
    if not POOL_NAME.match(pool):
        raise ValueError(
            f"invalid pool name {pool!r}: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return pool


SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_SECRETS = 64
"""Secrets one task may name."""


def validate_secret_names(secrets: list[str]) -> list[str]:
    """Names a task asks its agent to resolve. Only names cross the planes, never values.

    A name is also the environment variable a command task gets, hence identifier syntax.
    """
    if len(secrets) > MAX_SECRETS:
        raise ValueError(f"a task may name at most {MAX_SECRETS} secrets, not {len(secrets)}")
    seen: set[str] = set()
    for name in secrets:
        if not SECRET_NAME.match(name):
            raise ValueError(
                f"invalid secret name {name!r}: use 1-128 letters, digits or '_', not starting "
                "with a digit (for example 'db_password' or 'PGPASSWORD')"
            )
        if name in seen:
            raise ValueError(f"secret {name!r} is named twice")
        seen.add(name)
    return secrets
