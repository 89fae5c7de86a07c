"""The agent's heartbeat: its Redis key says it is alive; each beat also re-asserts its leases.

The key (``SET ... EX ttl``) is refreshed three times per TTL, so one slow beat is not a death.
A Redis outage is logged and survived: the dispatcher's watchdog pauses while Redis is down,
and the next successful beat recreates whatever a restarted Redis lost.

An agent that stops gracefully does not delete its key: it marks it stopped, for
``STOPPED_TTL``, and the dispatcher deletes it once it applied the agent's ``offline`` event
(its last). A key gone before the dispatcher applied the agent's last success would make the
watchdog take the exit for a death, hand the task to another agent and refuse the success.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import anyio
import msgspec
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError

from rexec.schemas.names import RedisKeys

from .leases import LeaseStore, LostLease

log = logging.getLogger("rexec.agent.heartbeat")

_json = msgspec.json.Encoder()

STOPPED_TTL = 600.0
"""Seconds a stopped agent's key lives unless the dispatcher deletes it first: longer than the
dispatcher takes to apply an agent's last events, short of an outage of many minutes."""


class Heartbeat:
    def __init__(
        self,
        *,
        redis: Redis,
        keys: RedisKeys,
        leases: LeaseStore,
        agent_id: str,
        pool: str,
        hostname: str,
        ttl: float,
        held: Callable[[], list[tuple[str, int]]],
        running: Callable[[], int],
        on_lost: Callable[[LostLease], None],
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.redis = redis
        self.key = keys.agent(agent_id)
        self.leases = leases
        self.agent_id = agent_id
        self.pool = pool
        self.hostname = hostname
        self.ttl = ttl
        self.interval = ttl / 3
        self._held = held
        self._running = running
        self._on_lost = on_lost
        self._on_refused = on_refused
        self.refused_for = max(30.0, 5 * ttl)
        """Seconds Redis may refuse our login before we take it that our credentials were
        withdrawn (a restarted Redis refuses too, until the dispatcher restores the user)."""
        self._refused_since: float | None = None
        self.beats = 0
        self.failures = 0
        """Beats that could not reach Redis."""
        self.failing = False
        """The last beat could not reach Redis."""

    async def beat(self) -> None:
        """One beat; raises ``RedisError`` or ``OSError`` when Redis cannot be reached."""
        try:
            await self._beat()
        except AuthenticationError as exc:
            self._refused(str(exc))
            raise
        except (RedisError, OSError):
            self.failures += 1
            self.failing = True
            raise
        self.failing = False
        self._refused_since = None

    def _refused(self, error: str) -> None:
        self.failures += 1
        self.failing = True
        now = time.monotonic()
        if self._refused_since is None:
            self._refused_since = now
        elif now - self._refused_since >= self.refused_for and self._on_refused is not None:
            self._on_refused(
                f"Redis has refused this agent's login for {now - self._refused_since:.0f}s "
                f"({error}): its credentials were withdrawn (token revoked?)"
            )

    def _value(self, **extra: object) -> bytes:
        return _json.encode(
            {
                "pool": self.pool,
                "hostname": self.hostname,
                "pid": os.getpid(),
                "at": time.time(),
                "running": self._running(),
                **extra,
            }
        )

    async def _beat(self) -> None:
        await self.redis.set(self.key, self._value(), px=max(1, int(self.ttl * 1000)))
        for lost in await self.leases.reassert(self._held()):
            self._on_lost(lost)
        await self.leases.release_pending()
        self.beats += 1

    async def run(self) -> None:
        """Beat forever; the caller cancels it."""
        failing = False
        while True:
            await anyio.sleep(self.interval)
            try:
                await self.beat()
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning(
                        "heartbeat failed: Redis unreachable, retrying",
                        extra={"agent_id": self.agent_id, "error": str(exc)},
                    )
                failing = True
                continue
            if failing:
                log.info("heartbeat restored", extra={"agent_id": self.agent_id})
            failing = False

    async def stop(self) -> None:
        """Mark the key stopped: the dispatcher deletes it after this agent's last events."""
        try:
            await self.redis.set(self.key, self._value(state="stopped"), px=int(STOPPED_TTL * 1000))
        except (RedisError, OSError) as exc:
            log.warning(
                "could not mark the heartbeat key stopped; it expires by itself",
                extra={"agent_id": self.agent_id, "error": str(exc)},
            )
