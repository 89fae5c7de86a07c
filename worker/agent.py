"""The agent's lifecycle: connect, first heartbeat, control queue, serve, drain, go offline.

What happens to each delivery, from the pool queue to a released lease, is the
:class:`~rexec.worker.handler.TaskHandler`'s: the agent builds it once every part it needs
exists (the broker channel, the event publisher, the lease store, the child pool) and hands
it each delivery.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import aio_pika
import aiormq.exceptions
import anyio
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from anyio.abc import TaskGroup, TaskStatus
from redis.asyncio import Redis
from redis.exceptions import RedisError

from rexec.schemas import messages, names, signing, tls
from rexec.schemas.amqp import connect_cluster, connection_up, parse_amqp_urls, safe_url
from rexec.schemas.names import RedisKeys
from rexec.schemas.redis_client import call_timeout, open_redis
from rexec.schemas.redis_url import RedisURLError
from rexec.schemas.settings import Settings, key_list

from .allow import preload_modules
from .attempts import Attempts, StopReason
from .children import open_child_pool
from .control import ControlHandler
from .deadletter import dead_letter
from .delivery import ack
from .events import EventPublisher
from .execution import Executor
from .handler import TaskHandler
from .health import HealthApp, HealthServer
from .heartbeat import Heartbeat
from .intake import Intake
from .leases import LeaseStore, LostLease
from .logserver import LogSource
from .logstore import LogStore, LogStoreError, open_store
from .metrics import AgentMetrics
from .reports import Reporter
from .secrets import (
    Masker,
    Resolver,
    SecretsBackend,
    SecretsConfigError,
    build_backend,
    build_resolver,
    hidden_env,
)
from .status import AgentStats, Counters

log = logging.getLogger("rexec.agent")

CONTROL_PREFETCH = 64
CONTROL_LOOK_AGAIN = 0.5
CONTROL_LOOK_AGAIN_MAX = 10.0
"""Seconds between looks for a control queue the dispatcher has not declared yet (doubling)."""
SHUTDOWN_GRACE = 30.0
"""Seconds the drain waits for stopped attempts to report, after the drain timeout."""
OFFLINE_TIMEOUT = 10.0
RECONNECT_INTERVAL = 1.0
"""Seconds between reconnection attempts: results wait in memory meanwhile, so retry soon."""
LOG_PRUNE_INTERVAL = 3600.0
"""Seconds between sweeps of attempt logs past ``REXEC_LOG_RETENTION``."""


class AgentError(Exception):
    """The agent cannot start or run; the text says what is wrong and what to do."""


@dataclass
class _Signals:
    """What ``run`` waits on; made inside it, since anyio events need the running loop."""

    stop_requested: anyio.Event = field(default_factory=anyio.Event)
    hurry: anyio.Event = field(default_factory=anyio.Event)
    finished: anyio.Event = field(default_factory=anyio.Event)


@dataclass(frozen=True)
class _Parts:
    """What exists once connected to the broker and Redis."""

    channel: AbstractChannel
    dead_exchange: AbstractExchange
    publisher: EventPublisher
    leases: LeaseStore
    heartbeat: Heartbeat
    intake: Intake


class Agent:
    """One agent of one pool. Constructible without registration, so tests run it in-process.

    ``await agent.run()`` runs until ``request_shutdown()`` (or ``await agent.shutdown()``)
    and the drain completes.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        agent_id: str,
        pool: str,
        allow: Sequence[str],
        concurrency: int = 4,
        drain_timeout: float = 30.0,
        hostname: str | None = None,
        pause_after: float = 1.0,
        return_after: float = 300.0,
        secrets_backend: SecretsBackend | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.settings = settings
        self.agent_id = agent_id
        self.pool = pool
        self.allow = list(allow)
        self.concurrency = concurrency
        self.drain_timeout = drain_timeout
        self.hostname = hostname or socket.gethostname()
        self.pause_after = pause_after
        self.return_after = return_after
        self.keys = RedisKeys(settings.redis_prefix)
        self.verifier = _verifier(settings)
        self.broker_user = broker_user(settings.amqp_url)
        try:
            self.logs: LogStore = open_store(settings)
        except LogStoreError as exc:
            raise AgentError(str(exc)) from None
        self.stats = AgentStats()
        self.metrics = AgentMetrics(self)
        try:
            backend = secrets_backend or build_backend(settings)
        except SecretsConfigError as exc:
            raise AgentError(str(exc)) from None
        self.masker = Masker()
        """Every secret value this agent resolved: masked in its events and output."""
        self.secrets: Resolver = build_resolver(settings, self.masker, backend)
        self.hidden_env = hidden_env(settings, backend)
        self.reporter = Reporter(agent_id, self.masker)
        self.attempts = Attempts()
        self._stop_flag = False
        self._hurry_flag = False
        self._stop_requested_at: float | None = None
        self._signals: _Signals | None = None
        """Made by ``run``; None before it (and ``run`` runs once)."""
        self._connection: AbstractRobustConnection | None = None
        self._events_channel: AbstractChannel | None = None
        self._parts: _Parts | None = None
        self._handler: TaskHandler | None = None
        """Set while the agent consumes its pool queue."""
        self._failure: AgentError | None = None
        self._serve_scope: anyio.CancelScope | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def request_shutdown(self, *, immediate: bool = False) -> None:
        """Start the graceful drain (``immediate``: hand running attempts back at once)."""
        self._stop_flag = True
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        self._hurry_flag = self._hurry_flag or immediate
        if self._signals is not None:
            self._signals.stop_requested.set()
            if immediate:
                self._signals.hurry.set()

    async def shutdown(self, *, immediate: bool = False) -> None:
        """Drain and wait until ``run`` has finished."""
        self.request_shutdown(immediate=immediate)
        if self._signals is not None:
            await self._signals.finished.wait()

    @property
    def running(self) -> int:
        return len(self.attempts)

    def _log(self, level: int, event: str, **fields: object) -> None:
        log.log(level, event, extra={"agent_id": self.agent_id, "pool": self.pool, **fields})

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self._signals is not None:
            raise RuntimeError("an Agent runs once; make a new one")
        signals = self._signals = _Signals()
        if self._stop_flag:
            signals.stop_requested.set()
        if self._hurry_flag:
            signals.hurry.set()
        failure: AgentError | None = None
        try:
            health = self._health_server()
            async with anyio.create_task_group() as tg:
                if health is not None:
                    tg.start_soon(health.run)
                try:
                    async with AsyncExitStack() as stack:
                        try:
                            redis = open_redis(
                                self.settings.redis_url,
                                timeout=call_timeout(self.settings.heartbeat_ttl),
                            )
                        except RedisURLError as exc:  # e.g. one handed over at registration
                            raise AgentError(str(exc)) from None
                        stack.push_async_callback(redis.aclose)
                        connection = await self._connect()
                        stack.push_async_callback(_close_quietly, connection)
                        await self._serve(connection, redis, signals, task_status)
                except AgentError as exc:  # raised unwrapped, not in an exception group
                    failure = exc
                finally:
                    if health is not None:
                        health.stop()
        finally:
            signals.finished.set()
        if failure is not None:
            raise failure

    def _health_server(self) -> HealthServer | None:
        port = self.settings.health_port
        if not port:
            return None
        try:
            app = HealthApp(
                self,
                self.metrics,
                LogSource(self.logs, self.verifier, self.agent_id, self.pool),
            )
            server = HealthServer(app, port)
        except (OSError, ValueError, OverflowError) as exc:
            raise AgentError(
                f"cannot serve health checks on port {port}: {exc}; set REXEC_HEALTH_PORT "
                "to a free port (or 0 for none)"
            ) from None
        self._log(
            logging.INFO,
            "health server listening",
            port=port,
            paths=["/healthz", "/readyz", "/metrics", "/logs/<task_id>/<attempt>"],
        )
        return server

    async def _connect(self) -> AbstractRobustConnection:
        name = names.agent_connection_name(self.pool, self.agent_id, self.hostname)
        try:
            return await connect_cluster(
                self.settings.amqp_url, connection_name=name, reconnect_interval=RECONNECT_INTERVAL
            )
        except Exception as exc:
            if (problem := tls.certificate_problem(exc)) is not None:
                where = f"RabbitMQ at {', '.join(safe_url(u) for u in parse_amqp_urls(self.settings.amqp_url))}"
                raise AgentError(tls.describe(problem, "amqp", where)) from None
            raise AgentError(
                f"cannot connect to RabbitMQ: {exc}; "
                "check REXEC_AMQP_URL and that the broker is running"
            ) from None

    async def _events_exchange(self, connection: AbstractRobustConnection) -> AbstractExchange:
        """The events exchange on a channel of its own, replacing (and closing) the last one:
        the publisher asks for a fresh one when the broker nacks (``events.py``)."""
        channel = await connection.channel(publisher_confirms=True)
        old, self._events_channel = self._events_channel, channel
        if old is not None:
            await _close_quietly(old)
        return await channel.get_exchange(names.EVENTS_EXCHANGE, ensure=False)

    async def _serve(
        self,
        connection: AbstractRobustConnection,
        redis: Redis,
        signals: _Signals,
        task_status: TaskStatus[None],
    ) -> None:
        self._connection = connection
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=prefetch_for(self.concurrency))
        queue = await self._pool_queue(channel)
        leases = LeaseStore(redis, self.keys, self.pool, self.agent_id)
        parts = self._parts = _Parts(
            channel=channel,
            dead_exchange=await channel.get_exchange(names.DEAD_EXCHANGE, ensure=False),
            publisher=EventPublisher(
                await self._events_exchange(connection),
                user_id=self.broker_user,
                renew=lambda: self._events_exchange(connection),
            ),
            leases=leases,
            heartbeat=Heartbeat(
                redis=redis,
                keys=self.keys,
                leases=leases,
                agent_id=self.agent_id,
                pool=self.pool,
                hostname=self.hostname,
                ttl=self.settings.heartbeat_ttl,
                held=lambda: sorted(self.attempts.held),
                running=lambda: self.running,
                on_lost=self._on_lease_lost,
                on_refused=self._credentials_refused,
            ),
            intake=Intake(
                queue,
                self.concurrency,
                pause_after=self.pause_after,
                return_after=self.return_after,
                agent_id=self.agent_id,
            ),
        )
        if not await self._first_beat(parts.heartbeat, signals):
            return
        with anyio.CancelScope() as self._serve_scope:
            await self._serve_parts(connection, parts, signals, task_status)
        if self._failure is not None:
            raise self._failure
        await parts.heartbeat.stop()
        counters = self.counters()
        self._log(
            logging.INFO,
            "agent stopped",
            **_asdict(self.stats),
            events=counters.events,
            event_batches=counters.event_batches,
        )

    async def _serve_parts(
        self,
        connection: AbstractRobustConnection,
        parts: _Parts,
        signals: _Signals,
        task_status: TaskStatus[None],
    ) -> None:
        async with anyio.create_task_group() as outer:
            outer.start_soon(parts.publisher.run)
            async with open_child_pool(
                self.concurrency,
                self.settings.max_result_bytes,
                masker=self.masker,
                hidden_env=self.hidden_env,
                preload=preload_modules(self.allow),
                grace=self.settings.kill_grace,
            ) as children:
                handler = TaskHandler(
                    agent_id=self.agent_id,
                    pool=self.pool,
                    allow=self.allow,
                    verifier=self.verifier,
                    slots=parts.intake,
                    emit=parts.publisher.emit,
                    leases=parts.leases,
                    runner=Executor(
                        children,
                        self.reporter,
                        self.logs,
                        self.masker.mask,
                        self.secrets,
                        hidden_env=self.hidden_env,
                    ),
                    dead_letter=lambda message, reason: self._dead_letter(parts, message, reason),
                    reporter=self.reporter,
                    attempts=self.attempts,
                    stats=self.stats,
                    metrics=self.metrics,
                )
                async with anyio.create_task_group() as work:
                    work.start_soon(parts.leases.run)
                    work.start_soon(parts.heartbeat.run)
                    work.start_soon(self._prune_logs)
                    await parts.publisher.emit(
                        messages.AgentOnline(
                            agent_id=self.agent_id,
                            pool=self.pool,
                            hostname=self.hostname,
                            pid=os.getpid(),
                            concurrency=self.concurrency,
                            at=time.time(),
                        )
                    )
                    work.start_soon(self._start_control, connection)
                    await parts.intake.start()
                    work.start_soon(parts.intake.run)
                    work.start_soon(self._consume, parts.intake, handler, work)
                    self._log(
                        logging.INFO,
                        "agent ready",
                        concurrency=self.concurrency,
                        allow=self.allow,
                        secrets_backend=self.secrets.backend.name,
                        queue=names.pool_queue(self.pool),
                    )
                    self._handler = handler
                    task_status.started()
                    await signals.stop_requested.wait()
                    await self._drain(parts.intake, handler, signals)
                    work.cancel_scope.cancel()
            await self._go_offline(parts.publisher)

    async def _prune_logs(self) -> None:
        while True:
            try:
                removed = await anyio.to_thread.run_sync(self.logs.prune, time.time())
            except Exception as exc:
                self._log(logging.WARNING, "could not prune old task logs", error=repr(exc))
            else:
                if removed:
                    self._log(logging.INFO, "pruned old task logs", removed=removed)
            await anyio.sleep(LOG_PRUNE_INTERVAL)

    async def _pool_queue(self, channel: AbstractChannel) -> AbstractQueue:
        name = names.pool_queue(self.pool)
        try:
            return await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            raise AgentError(
                f"queue {name} does not exist: create pool {self.pool!r} first "
                f"(rexec pool create {self.pool}) or check --pool"
            ) from None
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise AgentError(
                f"access to queue {name} refused: {exc}; this agent's broker credentials "
                f"do not cover pool {self.pool!r}"
            ) from None

    async def _first_beat(self, heartbeat: Heartbeat, signals: _Signals) -> bool:
        """The heartbeat must exist before any claim; wait for Redis if needed."""
        delay = 0.1
        while not signals.stop_requested.is_set():
            try:
                await heartbeat.beat()
                return True
            except (RedisError, OSError) as exc:
                problem = tls.certificate_problem(exc)
                if isinstance(problem, ssl.SSLCertVerificationError):  # will not fix itself
                    where = f"Redis at {safe_url(self.settings.redis_url)}"
                    raise AgentError(tls.describe(problem, "redis", where)) from None
                self._log(logging.WARNING, "Redis unreachable, waiting", error=str(exc))
                with anyio.move_on_after(delay):
                    await signals.stop_requested.wait()
                delay = min(delay * 2, 2.0)
        return False

    async def _start_control(self, connection: AbstractRobustConnection) -> None:
        """Consume ``rexec.agent.<id>`` once the dispatcher has declared it (checked passively).

        On a loaded broker the declare may finish after the registration answered, so look
        again until the queue appears; meanwhile cancel requests arrive as cancel markers."""
        name = names.agent_queue(self.agent_id)
        delay = CONTROL_LOOK_AGAIN
        while True:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
                break
            except aio_pika.exceptions.ChannelClosed:
                await _close_quietly(channel)
            if delay == CONTROL_LOOK_AGAIN:
                self._log(
                    logging.WARNING,
                    "no control queue yet: cancel requests reach this agent as cancel markers "
                    "until it appears",
                    queue=name,
                )
            await anyio.sleep(delay)
            delay = min(delay * 2, CONTROL_LOOK_AGAIN_MAX)
        if delay != CONTROL_LOOK_AGAIN:
            self._log(logging.INFO, "control queue found", queue=name)
        await channel.set_qos(prefetch_count=CONTROL_PREFETCH)
        control = ControlHandler(self.attempts, self.agent_id, self._lease_lost)
        await queue.consume(control.on_message)

    async def _drain(self, intake: Intake, handler: TaskHandler, signals: _Signals) -> None:
        self._log(
            logging.INFO,
            "draining: intake stopped, waiting for running tasks",
            running=self.running,
            drain_timeout=self.drain_timeout,
        )
        await intake.stop()
        await _wait_idle(handler, self.drain_timeout, signals.hurry)
        for attempt in self.attempts.all():
            if attempt.stop(StopReason.SHUTDOWN):
                self._log(
                    logging.WARNING,
                    "drain deadline reached: handing the attempt back",
                    task_id=attempt.task.task_id,
                    attempt=attempt.task.attempt,
                )
        if not await _wait_idle(handler, SHUTDOWN_GRACE, None):
            self._log(logging.ERROR, "tasks still reporting at shutdown", running=self.running)

    async def _go_offline(self, publisher: EventPublisher) -> None:
        with anyio.move_on_after(OFFLINE_TIMEOUT):
            await publisher.emit(
                messages.AgentOffline(
                    agent_id=self.agent_id, pool=self.pool, reason="shutdown", at=time.time()
                )
            )
        publisher.close()

    async def _consume(self, intake: Intake, handler: TaskHandler, work: TaskGroup) -> None:
        async for message in intake.deliveries:
            handler.start(message, work)

    # -- health ------------------------------------------------------------------------------

    def liveness(self) -> str | None:
        """Why the agent should be restarted (None: it is alive): a drain that overran."""
        if self._stop_requested_at is None:
            return None
        limit = self.drain_timeout + SHUTDOWN_GRACE + OFFLINE_TIMEOUT
        overdue = time.monotonic() - self._stop_requested_at - limit
        if overdue > 0:
            return f"shutdown still running {overdue:.0f}s past its drain deadline ({limit:.0f}s)"
        return None

    def readiness(self) -> str | None:
        """Why the agent cannot take tasks now (None: connected to RabbitMQ and Redis)."""
        if self._stop_flag:
            return "draining: shutdown requested, intake stopped"
        connection, parts = self._connection, self._parts
        if self._handler is None or connection is None or parts is None:
            return "starting: connecting to RabbitMQ and Redis"
        if not connection_up(connection) or parts.channel.is_closed:
            return "RabbitMQ connection lost: reconnecting"
        if parts.heartbeat.failing:
            return "Redis unreachable: the heartbeat fails"
        # A saturated agent (intake paused, every slot busy) is ready: reporting it unready
        # would stall rolling updates exactly when the pool is busiest.
        return None

    def counters(self) -> Counters:
        """What the event publisher and the heartbeat counted (zero before they exist)."""
        parts = self._parts
        if parts is None:
            return Counters()
        return Counters(
            event_batches=parts.publisher.published_batches,
            events=parts.publisher.published_events,
            heartbeat_failures=parts.heartbeat.failures,
        )

    # -- leases lost and credentials refused -------------------------------------------------

    def _credentials_refused(self, why: str) -> None:
        """Our credentials are gone: we cannot report, so stop every attempt and exit."""
        if self._failure is not None:
            return
        self._failure = AgentError(f"{why}; stopped every running attempt and exited")
        for attempt in self.attempts.all():
            attempt.stop(StopReason.LEASE_LOST)
        self._log(logging.ERROR, "cut off: " + str(self._failure), running=self.running)
        if self._serve_scope is not None:
            self._serve_scope.cancel()

    def _on_lease_lost(self, lost: LostLease) -> None:
        self._lease_lost(lost.task_id, lost.attempt, lost.holder)

    def _lease_lost(self, task_id: str, attempt_no: int, holder: str | None) -> None:
        """Another agent holds this attempt now (it took it over): stop ours, report nothing."""
        if not self.attempts.lease_lost(task_id, attempt_no):
            return
        self.stats.leases_lost += 1
        by = f" by {holder}" if holder else ""
        self._log(
            logging.WARNING,
            f"lease for task {task_id} attempt {attempt_no} was taken over{by}; "
            "stopped the attempt",
            task_id=task_id,
            attempt=attempt_no,
            holder=holder,
        )

    # -- dead letters ------------------------------------------------------------------------

    async def _dead_letter(
        self, parts: _Parts, message: AbstractIncomingMessage, reason: str
    ) -> None:
        published = await dead_letter(
            parts.dead_exchange,
            message,
            reason=reason,
            pool=self.pool,
            agent_id=self.agent_id,
            user_id=self.broker_user,
        )
        if not published:
            await self._reject(message)
            return
        await ack(message, self.agent_id)
        self.stats.dead_lettered += 1
        self._log(
            logging.ERROR,
            "unusable task message dead-lettered",
            reason=reason,
            queue=names.dead_queue(self.pool),
        )

    async def _reject(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.reject(requeue=False)
        except Exception as exc:
            self._log(logging.WARNING, "reject failed", error=repr(exc))


async def _wait_idle(handler: TaskHandler, seconds: float, hurry: anyio.Event | None) -> bool:
    """Wait until the handler is idle; False on timeout (or once ``hurry`` is set)."""
    with anyio.move_on_after(seconds):
        waits = [handler.wait_idle] if hurry is None else [handler.wait_idle, hurry.wait]
        await _first_of(waits)
    return handler.busy == 0


async def _first_of(waits: Sequence[Callable[[], Awaitable[object]]]) -> None:
    """Return as soon as the first of ``waits`` returns."""
    async with anyio.create_task_group() as tg:

        async def wait(until: Callable[[], Awaitable[object]]) -> None:
            await until()
            tg.cancel_scope.cancel()

        for until in waits:
            tg.start_soon(wait, until)


def prefetch_for(concurrency: int) -> int:
    """Deliveries held unacked, each up to ``concurrency`` tasks once batches come: a quarter
    of the slots (at least 2, at most all), so a busy agent holds a few batches waiting, not
    ``concurrency`` of them. A delivery is acked as soon as its tasks start, so this bounds
    tasks waiting for a slot, not tasks running."""
    return min(concurrency, max(2, math.ceil(concurrency / 4)))


def _asdict(stats: AgentStats) -> dict[str, object]:
    return dict(stats.__dict__)


def _verifier(settings: Settings) -> signing.Verifier:
    keys = key_list(settings.signing_public_keys)
    if not keys:
        raise AgentError(
            "no signing public key: the agent runs only tasks signed by the orchestration "
            "plane; it learns the key at registration, or set REXEC_SIGNING_PUBLIC_KEYS"
        )
    try:
        return signing.Verifier(keys)
    except signing.KeyFormatError as exc:
        raise AgentError(f"{exc} (in REXEC_SIGNING_PUBLIC_KEYS)") from None


def broker_user(amqp_url: str) -> str:
    """The user the agent logs in to RabbitMQ as (aio-pika's default is guest)."""
    try:
        return parse_amqp_urls(amqp_url)[0].user or "guest"
    except ValueError:
        return "guest"


async def _close_quietly(closable: AbstractRobustConnection | AbstractChannel) -> None:
    try:
        await closable.close()
    except Exception as exc:
        log.debug("close failed", extra={"error": repr(exc)})
