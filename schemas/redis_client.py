"""One way for both planes to open Redis: directly, or through Sentinel (``redis_url.py``).

Through Sentinel the client is ``master_for(service)``: each new connection asks the Sentinels
where the master is, and a connection to a master that died or was demoted (``READONLY``) is
dropped, so after a failover the next command (the next heartbeat, the next watchdog tick)
reaches the promoted replica. Callers already treat ``RedisError``/``OSError`` as "Redis
unreachable, try again"; ``MasterNotFoundError`` (no Sentinel knows a master yet) is one.

Every call has a deadline and none is retried behind the caller's back: redis-py retries a
failed call ten times with backoff by default (and before 8.0 had no timeout at all), so a
frozen or partitioned Redis looked like a call that took a minute, not like an outage. Each
caller retries in its own loop (the next heartbeat, the watchdog's next tick, a claim's own
retry), and the watchdog sees the error and waits before judging agents.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from .redis_url import check_redis_url, is_sentinel, parse_sentinel_url


class SentinelRedis(Redis):
    """A master client that also closes its Sentinel connections when closed."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()


MAX_CALL_TIMEOUT = 5.0


def call_timeout(heartbeat_ttl: float) -> float:
    """Seconds a Redis call may take: a quarter of the heartbeat TTL (at most 5 s), so a beat
    lost in a partition fails in time for the next one to keep the key alive."""
    return min(MAX_CALL_TIMEOUT, max(0.25, heartbeat_ttl / 4))


def open_redis(url: str, *, timeout: float = MAX_CALL_TIMEOUT) -> Redis:
    """A ``redis.asyncio.Redis`` for ``REXEC_REDIS_URL``, whose calls fail after ``timeout``
    seconds (unless the URL sets ``socket_timeout``), never retried; close it with
    ``aclose()``."""
    check_redis_url(url)
    no_retries = Retry(NoBackoff(), 0)
    if not is_sentinel(url):
        return Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=no_retries
        )
    spec = parse_sentinel_url(url)
    timeouts = {
        "socket_timeout": min(spec.socket_timeout, timeout),
        "socket_connect_timeout": min(spec.socket_connect_timeout, timeout),
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        list(spec.sentinels),
        sentinel_kwargs={**timeouts, "password": spec.sentinel_password},
        **timeouts,
    )
    client: SentinelRedis = sentinel.master_for(
        spec.service,
        redis_class=SentinelRedis,
        db=spec.db,
        username=spec.username,
        password=spec.password,
        retry=no_retries,
    )
    client.sentinels = sentinel
    return client
