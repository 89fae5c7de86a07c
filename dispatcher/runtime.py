"""Connections the orchestration plane holds: database, Redis, and a confirming AMQP channel."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import aio_pika
import anyio
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aiormq.exceptions import AMQPError
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from rexec.schemas import messages, names
from rexec.schemas.amqp import connect_cluster
from rexec.schemas.names import RedisKeys
from rexec.schemas.redis_client import call_timeout, open_redis
from rexec.schemas.settings import Settings
from rexec.schemas.signing import Signer

from . import topology
from .batching import BatchSizes
from .db.engine import make_engine, make_sessionmaker
from .groupcommit import GroupCommit
from .metrics import Metrics
from .outbox import Due
from .signing_key import announced_public_keys, load_signer

log = logging.getLogger("rexec.runtime")

AGENT_QUEUE_WAIT = 5.0
"""Seconds a registration waits for its agent's control queue before answering without it."""

BROKER_ERRORS: tuple[type[Exception], ...] = (AMQPError, ConnectionError, OSError, RuntimeError)
"""What a broker outage raises. aiormq raises a bare ``RuntimeError`` ("... closed") to open a
channel on a connection that is reconnecting, and ``ChannelInvalidStateError`` (a
``RuntimeError`` too, not an ``AMQPError``) to publish or ack on a channel being restored."""


class NewTaskPublisher(Protocol):
    """Publishes new tasks as their submit commits (``direct.DirectPublisher``)."""

    @property
    def lease(self) -> float:
        """Seconds the relay waits before publishing a row offered here; 0: offer nothing."""
        ...

    def offer(self, rows: Sequence[Due]) -> None: ...


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: Redis
    keys: RedisKeys
    connection: AbstractRobustConnection
    channel: AbstractChannel
    signer: Signer
    """Signs every task message; agents run only what verifies against its public key."""
    public_keys: list[str]
    metrics: Metrics = field(default_factory=Metrics)
    broker_users: dict[str, str | None] = field(default_factory=dict)
    """Broker user issued to each agent, as far as the events consumer looked them up."""
    relay_wakeup: anyio.Event = field(default_factory=anyio.Event)
    events_applied: anyio.Event = field(default_factory=anyio.Event)
    """Set (and replaced) each time the events consumer commits: long-polls wait on it."""
    known_pools: set[str] = field(default_factory=set)
    """Pools this process has seen exist (pools are never deleted): submits skip the look."""
    submits: GroupCommit[dict[str, Any], str] | None = None
    """Writes concurrent single submits together (made by ``service.submit`` on first use)."""
    background: TaskGroup | None = None
    """Where work outlives the request that started it (``rexec serve`` sets it)."""
    direct: NewTaskPublisher | None = None
    """Publishes new tasks as their submit commits (``rexec serve`` runs it); without it the
    relay publishes them."""
    batch_sizes: BatchSizes = field(init=False)
    """How many attempts the relay puts in one message, per pool."""
    _tasks_exchange: tuple[AbstractChannel, AbstractExchange] | None = field(
        default=None, init=False, repr=False
    )

    def __post_init__(self) -> None:
        self.batch_sizes = BatchSizes(self.settings.tasks_per_message)

    def wake_relay(self) -> None:
        self.relay_wakeup.set()

    def notify_applied(self) -> None:
        self.events_applied.set()
        self.events_applied = anyio.Event()

    async def renew_channel(self) -> None:
        """Replace the publishing channel with a fresh one. After losing a cluster node,
        RabbitMQ 3.10 was seen to nack every later publish on a channel whose first publish to
        a quorum queue came while that queue was electing a new leader; a new channel
        publishes normally."""
        old = self.channel
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            await old.close()
        except BROKER_ERRORS as exc:
            log.debug("closing the old channel failed", extra={"error": repr(exc)})

    async def exchange(self, name: str) -> AbstractExchange:
        return await self.channel.get_exchange(name)

    async def tasks_exchange(self) -> AbstractExchange:
        """``rexec.tasks`` on the publishing channel, looked up once per channel (again after
        ``renew_channel``): the relay and the direct publisher share it."""
        channel = self.channel
        if self._tasks_exchange is None or self._tasks_exchange[0] is not channel:
            self._tasks_exchange = (channel, await channel.get_exchange(names.TASKS_EXCHANGE))
        return self._tasks_exchange[1]

    async def declare_pool(self, pool: str) -> None:
        await topology.declare_pool(self.channel, pool, self.settings.delivery_limit)

    async def declare_agent_queue(self, agent_id: str) -> None:
        """Declare the agent's control queue, waiting for it at most ``AGENT_QUEUE_WAIT``.

        Creating a quorum queue took over a minute on a broker loaded by bench W5 (100,000
        tasks being consumed), so a registration waiting for it timed out. Past the wait the
        declare goes on in the background and the registration answers; the agent looks for
        its control queue until it appears. Each declare has a channel of its own: a channel
        answers one declare at a time, and 50 agents registering at once waited in line."""
        if self.background is None:
            await self._declare_agent_queue(agent_id)
            return
        done = anyio.Event()
        failure: list[Exception] = []

        async def declare() -> None:
            try:
                await self._declare_agent_queue(agent_id)
            except BROKER_ERRORS as exc:
                failure.append(exc)
                log.warning(
                    "could not declare an agent's control queue",
                    extra={"agent_id": agent_id, "error": repr(exc)},
                )
            finally:
                done.set()

        self.background.start_soon(declare)
        with anyio.move_on_after(AGENT_QUEUE_WAIT):
            await done.wait()
        if failure:
            raise failure[0]

    async def _declare_agent_queue(self, agent_id: str) -> None:
        channel = await self.connection.channel()
        try:
            await topology.declare_agent_queue(channel, agent_id)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await channel.close()
                except BROKER_ERRORS as exc:
                    log.debug("closing a declare's channel failed", extra={"error": repr(exc)})

    async def publish_control(self, agent_id: str, control: messages.Control) -> None:
        """Tell one agent to stop an attempt. Not mandatory: an agent whose control queue is
        gone has stopped, and has nothing left to stop."""
        exchange = await self.exchange(names.CONTROL_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(
                messages.encode(control),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=agent_id,
            mandatory=False,
        )


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    engine = make_engine(settings.database_url)
    redis = open_redis(settings.redis_url, timeout=call_timeout(settings.heartbeat_ttl))
    connection = await connect_cluster(
        settings.amqp_url, connection_name=names.dispatcher_connection_name(socket.gethostname())
    )
    try:
        # on_return_raises: a mandatory message the broker cannot route fails its publish.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await topology.declare_core(channel)
        sessions = make_sessionmaker(engine)
        signer = await load_signer(settings, sessions)
        yield Runtime(
            settings=settings,
            engine=engine,
            sessions=sessions,
            redis=redis,
            keys=RedisKeys(settings.redis_prefix),
            connection=connection,
            channel=channel,
            signer=signer,
            public_keys=announced_public_keys(settings, signer),
        )
    finally:
        await connection.close()
        await redis.aclose()
        await engine.dispose()
