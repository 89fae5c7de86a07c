"""Prometheus metrics of the orchestration plane, served at ``/metrics``.

Counters and histograms are updated where things happen (events consumer, watchdog); gauges
that describe the world (tasks by state, queue depth, live agents) are read at scrape time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from aio_pika.exceptions import AMQPError, ChannelNotFoundEntity
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from redis.exceptions import RedisError
from sqlalchemy import func, select

from rexec.schemas import names

from .db.models import Pool, Task

if TYPE_CHECKING:
    from .runtime import Runtime

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks = Gauge("rexec_tasks", "Tasks by pool and state.", ["pool", "state"], registry=r)
        self.queue_depth = Gauge(
            "rexec_queue_depth", "Messages ready in the pool's queue.", ["pool"], registry=r
        )
        self.agents_live = Gauge(
            "rexec_agents_live", "Agents whose heartbeat key is alive.", ["pool"], registry=r
        )
        self.submit_to_start = Histogram(
            "rexec_submit_to_start_seconds",
            "From submission to the start of an attempt.",
            ["pool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.run_time = Histogram(
            "rexec_run_seconds",
            "From the start of the last attempt to its end.",
            ["pool", "state"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requeues = Counter(
            "rexec_requeues",
            "Attempts handed back to the queue, by reason.",
            ["reason"],
            registry=r,
        )
        self.task_messages = Counter(
            "rexec_task_messages",
            "Task messages the relay published, by pool (a batch of attempts is one).",
            ["pool"],
            registry=r,
        )
        self.attempts_published = Counter(
            "rexec_attempts_published",
            "Attempts the relay published, by pool (in single messages or in batches).",
            ["pool"],
            registry=r,
        )
        self.stale_events = Counter(
            "rexec_stale_events",
            "Agent events rejected by fencing, by reason.",
            ["reason"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "rexec_dead_lettered",
            "Messages rexec dead-lettered, by source.",
            ["source"],
            registry=r,
        )


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
