"""One way for both planes to open Redis: directly, or through Sentinel (``redis_url.py``).

Through Sentinel the client is ``master_for(service)``: each new connection asks the Sentinels
where the master is, and a connection to a master that died or was demoted (``READONLY``) is
dropped, so after a failover the next command (the next heartbeat, the next watchdog tick)
reaches the promoted replica. Callers already treat ``RedisError``/``OSError`` as "Redis
unreachable, try again"; ``MasterNotFoundError`` (no Sentinel knows a master yet) is one.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel

from .redis_url import check_redis_url, is_sentinel, parse_sentinel_url


class SentinelRedis(Redis):
    """A master client that also closes its Sentinel connections when closed."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()


def open_redis(url: str) -> Redis:
    """A ``redis.asyncio.Redis`` for ``REXEC_REDIS_URL``; close it with ``aclose()``."""
    check_redis_url(url)
    if not is_sentinel(url):
        return Redis.from_url(url)
    spec = parse_sentinel_url(url)
    timeouts = {
        "socket_timeout": spec.socket_timeout,
        "socket_connect_timeout": spec.socket_connect_timeout,
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
    )
    client.sentinels = sentinel
    return client
