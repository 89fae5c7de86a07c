"""The scrape-time gauges of ``/metrics``: what describes the world, read when scraped.

``render`` refreshes the gauges that ``metrics.Metrics`` defines (tasks by pool and state from
the database, each pool queue's depth from the broker, live agents from their Redis heartbeat
keys), then renders the whole registry in the text format. A broker or Redis outage leaves its
gauge empty rather than failing the scrape.
"""

from __future__ import annotations

import msgspec
from aio_pika.exceptions import AMQPError, ChannelNotFoundEntity
from prometheus_client import generate_latest
from redis.exceptions import RedisError
from sqlalchemy import func, select

from rexec.schemas import names

from .db.models import Pool, Task
from .runtime import Runtime


async def render(rt: Runtime) -> bytes:
    """Refresh the scrape-time gauges, then render everything in the text format."""
    m = rt.metrics
    async with rt.sessions() as session:
        pools = list((await session.scalars(select(Pool.name))).all())
        counts = (
            await session.execute(
                select(Task.pool, Task.state, func.count()).group_by(Task.pool, Task.state)
            )
        ).all()
    m.tasks.clear()
    for pool, state, count in counts:
        m.tasks.labels(pool, state).set(count)
    m.queue_depth.clear()
    try:
        channel = await rt.connection.channel()
        try:
            for pool in pools:
                try:
                    queue = await channel.declare_queue(names.pool_queue(pool), passive=True)
                except ChannelNotFoundEntity:  # the broker closed the channel; the rest count
                    channel = await rt.connection.channel()
                    continue
                m.queue_depth.labels(pool).set(queue.declaration_result.message_count or 0)
        finally:
            await channel.close()
    except AMQPError:
        pass  # the broker is down: no depth rather than a failed scrape
    m.agents_live.clear()
    try:
        live: dict[str, int] = {}
        async for key in rt.redis.scan_iter(match=rt.keys.agents_pattern(), count=1000):
            text = key.decode() if isinstance(key, bytes) else str(key)
            if text.endswith(":leases"):
                continue
            value = await rt.redis.get(key)
            if value:
                pool = _pool_of(value)
                live[pool] = live.get(pool, 0) + 1
        for pool, count in live.items():
            m.agents_live.labels(pool).set(count)
    except (RedisError, OSError):
        pass
    return generate_latest(m.registry)


def _pool_of(value: bytes | str) -> str:
    try:
        beat = msgspec.json.decode(value)
    except msgspec.DecodeError:
        return "unknown"
    return str(beat.get("pool", "unknown")) if isinstance(beat, dict) else "unknown"
