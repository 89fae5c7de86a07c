"""The agent: consumes its pool's queue, claims, runs and reports attempts, and drains on stop.

For each delivery: verify and decode it (dead-letter what cannot be used); then for each task
it carries (one, or a batch): refuse expired and disallowed tasks, claim the lease, publish
``started`` and wait for the broker's confirm, settle it (the delivery is acked once all its
tasks are settled, ``delivery.py``), run, report the outcome, release the lease. The delivery
is never held during the run: from the ack on, the lease and the heartbeat carry the
responsibility for the attempt.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

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

from rexec.schemas import messages, names, signing, tls, tracing
from rexec.schemas.amqp import connect_cluster, connection_up, parse_amqp_urls, safe_url
from rexec.schemas.names import LEASE_TOMBSTONE, RedisKeys
from rexec.schemas.redis_client import open_redis
from rexec.schemas.redis_url import RedisURLError
from rexec.schemas.settings import Settings, key_list

from . import spans
from .allow import allowed, preload_modules, refusal, task_target
from .attempts import Attempt, Attempts, StopReason
from .children import open_child_pool
from .control import ControlHandler
from .deadletter import dead_letter
from .delivery import DeliveredTask, Delivery, ack, requeue
from .events import EventPublisher
from .execution import Executor
from .health import HealthServer
from .heartbeat import Heartbeat
from .intake import Intake, Slot
from .leases import Claim, ClaimResult, LeaseStore, LostLease, OwnClaims
from .logstore import LogStore, LogStoreError, open_store
from .metrics import AgentMetrics, Counters, Outcome, attempt_outcome
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
class AgentStats:
    """Counters for tests and logs: what happened to the deliveries this agent received."""

    deliveries: int = 0
    """Messages taken from the pool queue (a batch carries several tasks)."""
    received: int = 0
    """Tasks those messages carried."""
    dead_lettered: int = 0
    expired: int = 0
    not_allowed: int = 0
    duplicates: int = 0
    cancelled_before_start: int = 0
    started: int = 0
    finished: int = 0
    leases_lost: int = 0
    handed_back: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    """Attempts cancelled while running (``cancelled_before_start``: before they started)."""
    stopped_at_drain: int = 0
    """Running attempts stopped at the drain deadline and reported back for a retry."""

    def ran(self, outcome: Outcome) -> None:
        """Count how an attempt that ran ended (a lost lease is counted where it is found)."""
        if outcome is Outcome.SUCCEEDED:
            self.succeeded += 1
        elif outcome is Outcome.FAILED:
            self.failed += 1
        elif outcome is Outcome.TIMED_OUT:
            self.timed_out += 1
        elif outcome is Outcome.CANCELLED:
            self.cancelled += 1
        elif outcome is Outcome.HANDED_BACK:
            self.stopped_at_drain += 1


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
        self._reporter = Reporter(agent_id, self.masker)
        self.attempts = Attempts()
        self._stop_flag = False
        self._hurry_flag = False
        self._hurry: anyio.Event | None = None
        self._stop_requested: anyio.Event | None = None
        self._finished: anyio.Event | None = None
        self._held: set[tuple[str, int]] = set()
        self._own_claims = OwnClaims()
        self._handlers = 0
        self._handlers_idle: anyio.Event | None = None
        self._started = False
        self._stop_requested_at: float | None = None
        self._connection: AbstractRobustConnection | None = None
        self._failure: AgentError | None = None
        self._serve_scope: anyio.CancelScope | None = None
        self._wired = False  # the parts below exist
        self._serving = False  # consuming was started
        # Set while running:
        self._channel: AbstractChannel
        self._events_channel: AbstractChannel | None = None
        self._dead_exchange: AbstractExchange
        self._intake: Intake
        self._publisher: EventPublisher
        self._leases: LeaseStore
        self._executor: Executor
        self._heartbeat: Heartbeat

    # -- lifecycle -------------------------------------------------------------------------

    def request_shutdown(self, *, immediate: bool = False) -> None:
        """Start the graceful drain (``immediate``: hand running attempts back at once)."""
        self._stop_flag = True
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        self._hurry_flag = self._hurry_flag or immediate
        if self._stop_requested is not None:
            self._stop_requested.set()
        if immediate and self._hurry is not None:
            self._hurry.set()

    async def shutdown(self, *, immediate: bool = False) -> None:
        """Drain and wait until ``run`` has finished."""
        self.request_shutdown(immediate=immediate)
        if self._finished is not None:
            await self._finished.wait()

    @property
    def running(self) -> int:
        return len(self.attempts)

    def _log(self, level: int, event: str, **fields: object) -> None:
        log.log(level, event, extra={"agent_id": self.agent_id, "pool": self.pool, **fields})

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self._started:
            raise RuntimeError("an Agent runs once; make a new one")
        self._started = True
        self._stop_requested = anyio.Event()
        self._finished = anyio.Event()
        self._handlers_idle = anyio.Event()
        self._handlers_idle.set()
        self._hurry = anyio.Event()
        if self._stop_flag:
            self._stop_requested.set()
        if self._hurry_flag:
            self._hurry.set()
        failure: AgentError | None = None
        try:
            health = self._health_server()
            async with anyio.create_task_group() as tg:
                if health is not None:
                    tg.start_soon(health.run)
                try:
                    async with AsyncExitStack() as stack:
                        try:
                            redis = open_redis(self.settings.redis_url)
                        except RedisURLError as exc:  # e.g. one handed over at registration
                            raise AgentError(str(exc)) from None
                        stack.push_async_callback(redis.aclose)
                        connection = await self._connect()
                        stack.push_async_callback(_close_quietly, connection)
                        await self._serve(connection, redis, task_status)
                except AgentError as exc:  # raised unwrapped, not in an exception group
                    failure = exc
                finally:
                    if health is not None:
                        health.stop()
        finally:
            self._finished.set()
        if failure is not None:
            raise failure

    def _health_server(self) -> HealthServer | None:
        port = self.settings.health_port
        if not port:
            return None
        try:
            server = HealthServer(self, port)
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
        self, connection: AbstractRobustConnection, redis: Redis, task_status: TaskStatus[None]
    ) -> None:
        assert self._stop_requested is not None
        self._connection = connection
        self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await self._channel.set_qos(prefetch_count=prefetch_for(self.concurrency))
        queue = await self._pool_queue(self._channel)
        self._dead_exchange = await self._channel.get_exchange(names.DEAD_EXCHANGE, ensure=False)
        self._publisher = EventPublisher(
            await self._events_exchange(connection),
            user_id=self.broker_user,
            renew=lambda: self._events_exchange(connection),
        )
        self._leases = LeaseStore(redis, self.keys, self.pool, self.agent_id)
        self._heartbeat = Heartbeat(
            redis=redis,
            keys=self.keys,
            leases=self._leases,
            agent_id=self.agent_id,
            pool=self.pool,
            hostname=self.hostname,
            ttl=self.settings.heartbeat_ttl,
            held=lambda: sorted(self._held),
            running=lambda: self.running,
            on_lost=self._on_lease_lost,
            on_refused=self._credentials_refused,
        )
        self._intake = Intake(
            queue,
            self.concurrency,
            pause_after=self.pause_after,
            return_after=self.return_after,
            agent_id=self.agent_id,
        )
        self._wired = True
        if not await self._first_beat():
            return
        with anyio.CancelScope() as self._serve_scope:
            await self._serve_wired(connection, task_status)
        if self._failure is not None:
            raise self._failure
        await self._heartbeat.stop()
        counters = self.counters()
        self._log(
            logging.INFO,
            "agent stopped",
            **_asdict(self.stats),
            events=counters.events,
            event_batches=counters.event_batches,
        )

    async def _serve_wired(
        self, connection: AbstractRobustConnection, task_status: TaskStatus[None]
    ) -> None:
        assert self._stop_requested is not None
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._publisher.run)
            async with open_child_pool(
                self.concurrency,
                self.settings.max_result_bytes,
                masker=self.masker,
                hidden_env=self.hidden_env,
                preload=preload_modules(self.allow),
            ) as children:
                self._executor = Executor(
                    children,
                    self._reporter,
                    self.logs,
                    self.masker.mask,
                    self.secrets,
                    hidden_env=self.hidden_env,
                )
                async with anyio.create_task_group() as work:
                    work.start_soon(self._leases.run)
                    work.start_soon(self._heartbeat.run)
                    work.start_soon(self._prune_logs)
                    await self._emit(
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
                    await self._intake.start()
                    work.start_soon(self._intake.run)
                    work.start_soon(self._consume, work)
                    self._log(
                        logging.INFO,
                        "agent ready",
                        concurrency=self.concurrency,
                        allow=self.allow,
                        secrets_backend=self.secrets.backend.name,
                        queue=names.pool_queue(self.pool),
                    )
                    self._serving = True
                    task_status.started()
                    await self._stop_requested.wait()
                    await self._drain()
                    work.cancel_scope.cancel()
            await self._go_offline()

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

    async def _first_beat(self) -> bool:
        """The heartbeat must exist before any claim; wait for Redis if needed."""
        assert self._stop_requested is not None
        delay = 0.1
        while not self._stop_requested.is_set():
            try:
                await self._heartbeat.beat()
                return True
            except (RedisError, OSError) as exc:
                problem = tls.certificate_problem(exc)
                if isinstance(problem, ssl.SSLCertVerificationError):  # will not fix itself
                    where = f"Redis at {safe_url(self.settings.redis_url)}"
                    raise AgentError(tls.describe(problem, "redis", where)) from None
                self._log(logging.WARNING, "Redis unreachable, waiting", error=str(exc))
                with anyio.move_on_after(delay):
                    await self._stop_requested.wait()
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

    async def _drain(self) -> None:
        self._log(
            logging.INFO,
            "draining: intake stopped, waiting for running tasks",
            running=self.running,
            drain_timeout=self.drain_timeout,
        )
        await self._intake.stop()
        await self._wait_handlers(self.drain_timeout, hurry=True)
        left = self.attempts.all()
        for attempt in left:
            if attempt.stop(StopReason.SHUTDOWN):
                self._log(
                    logging.WARNING,
                    "drain deadline reached: handing the attempt back",
                    task_id=attempt.task.task_id,
                    attempt=attempt.task.attempt,
                )
        if not await self._wait_handlers(SHUTDOWN_GRACE, hurry=False):
            self._log(logging.ERROR, "tasks still reporting at shutdown", running=self.running)

    async def _wait_handlers(self, seconds: float, *, hurry: bool) -> bool:
        """Wait until no delivery is being handled; False on timeout (or a hurry request)."""
        assert self._hurry is not None
        with anyio.move_on_after(seconds):
            while self._handlers:
                assert self._handlers_idle is not None
                events = [self._handlers_idle, self._hurry] if hurry else [self._handlers_idle]
                await _first_of(events)
                if hurry and self._hurry.is_set():
                    break
        return self._handlers == 0

    async def _go_offline(self) -> None:
        with anyio.move_on_after(OFFLINE_TIMEOUT):
            await self._emit(
                messages.AgentOffline(
                    agent_id=self.agent_id, pool=self.pool, reason="shutdown", at=time.time()
                )
            )
        self._publisher.close()

    # -- deliveries --------------------------------------------------------------------------

    async def _consume(self, work: TaskGroup) -> None:
        async for message in self._intake.deliveries:
            self._enter_handler()
            work.start_soon(self._handle_guarded, message, work)

    def _enter_handler(self) -> None:
        self._handlers += 1
        if self._handlers_idle is not None and self._handlers_idle.is_set():
            self._handlers_idle = anyio.Event()

    def _leave_handler(self) -> None:
        self._handlers -= 1
        if self._handlers == 0 and self._handlers_idle is not None:
            self._handlers_idle.set()

    async def _handle_guarded(self, message: AbstractIncomingMessage, work: TaskGroup) -> None:
        try:
            await self._handle(message, work)
        except Exception:
            log.exception(
                "unexpected error handling a delivery; returning it unless already acked",
                extra={"agent_id": self.agent_id},
            )
            await requeue(message)
        finally:
            self._leave_handler()

    async def _handle(self, message: AbstractIncomingMessage, work: TaskGroup) -> None:
        """Check the delivery as a whole (signature, format, pool), then handle each task:
        a batch's tasks side by side, each in a handler of its own."""
        self.stats.deliveries += 1
        try:
            self.verifier.verify(
                message.body, (message.headers or {}).get(signing.SIGNATURE_HEADER)
            )
        except signing.SignatureError as exc:
            await self._dead_letter(message, f"refused: {exc}")
            return
        batched = message.type == messages.TASK_BATCH_TYPE
        try:
            tasks, traceparents = _decode(message.body, batched)
            for task in tasks:
                if task.pool != self.pool:
                    raise messages.MessageError(
                        f"task {task.task_id} is for pool {task.pool!r}, but it reached the "
                        f"queue of pool {self.pool!r}"
                    )
        except messages.MessageError as exc:
            await self._dead_letter(message, str(exc))
            return
        self.stats.received += len(tasks)
        if self._intake.stopped:
            await requeue(message)
            self.stats.handed_back += len(tasks)
            return
        delivery = Delivery(message, batched=batched, emit=self._emit, agent_id=self.agent_id)
        if not batched:
            await self._handle_task(delivery.task(tasks[0], message.headers))
            return
        items = [
            delivery.task(task, {"traceparent": tp} if tp else None)
            for task, tp in zip(tasks, traceparents or [""] * len(tasks), strict=True)
        ]
        for item in items:
            self._enter_handler()
            work.start_soon(self._handle_task_guarded, item)

    async def _handle_task_guarded(self, item: DeliveredTask) -> None:
        try:
            await self._handle_task(item)
        except Exception:
            log.exception(
                "unexpected error handling a task of a batch; handing it back unless started",
                extra={"agent_id": self.agent_id, "task_id": item.task.task_id},
            )
            if not item.settled:  # not started: let the next agent claim it
                await self._abandon(item.task)
            await item.hand_back("agent_error")
        finally:
            self._leave_handler()

    async def _handle_task(self, item: DeliveredTask) -> None:
        task = item.task
        if task.expires_at is not None and task.expires_at <= time.time():
            await self._finish_unstarted(item, self._reporter.event(messages.Expired, task))
            self.stats.expired += 1
            self._log_task(logging.INFO, "task expired before it started", task)
            return
        refused = self._refusal(task)
        if refused is not None:
            await self._finish_unstarted(item, refused)
            self.stats.not_allowed += 1
            self._log_task(logging.WARNING, "task refused", task, reason=refused.message)
            return
        slot = await self._intake.acquire()
        if slot is None:
            await self._hand_back(item, "draining" if self._intake.stopped else "no_slot")
            return
        try:
            if tracing.active():
                await self._claim_and_run_traced(item, slot)
            else:
                await self._claim_and_run(item, slot)
        finally:
            slot.release()

    async def _hand_back(self, item: DeliveredTask, reason: str) -> None:
        await item.hand_back(reason)
        self.stats.handed_back += 1

    def _refusal(self, task: messages.TaskMessage) -> messages.Failed | None:
        if task.kind == "command" and not task.argv:
            return self._reporter.failed(
                task, "InvalidTask", "command task with an empty argv", retryable=False
            )
        target = task_target(task)
        if not allowed(target, self.allow):
            return self._reporter.failed(
                task, "TargetNotAllowed", refusal(target, self.allow), retryable=False
            )
        return None

    async def _finish_unstarted(self, item: DeliveredTask, event: messages.Event) -> None:
        await self._emit(event)
        await item.settle()

    async def _claim_and_run_traced(self, item: DeliveredTask, slot: Slot) -> Outcome:
        """``_claim_and_run`` inside the attempt's span (claim, started, run, terminal event)."""
        span = spans.start_attempt(item.headers, item.task, self.agent_id)
        outcome: Outcome | None = None
        error: Exception | None = None
        try:
            outcome = await self._claim_and_run(item, slot)
            return outcome
        except Exception as exc:
            error = exc
            raise
        finally:
            spans.end_attempt(span, outcome, error)

    async def _claim_and_run(self, item: DeliveredTask, slot: Slot) -> Outcome:
        task = item.task
        key = (task.task_id, task.attempt)
        self._own_claims.claiming(key)
        try:
            claim = await self._claim(task)
        finally:
            self._own_claims.claimed(key)
        if (
            claim is not None
            and claim.outcome is Claim.DUPLICATE
            and claim.previous_holder == self.agent_id
            and self._own_claims.is_lost_reply(key, self._held)
        ):
            self._log_task(logging.WARNING, "claim answered late: the lease is ours", task)
            claim = ClaimResult(Claim.CLAIMED, "")
        if claim is None:  # draining while Redis was unreachable
            await self._hand_back(item, "draining")
            return Outcome.HANDED_BACK
        if claim.outcome is Claim.DUPLICATE:
            if claim.previous_holder not in (self.agent_id, LEASE_TOMBSTONE):
                # Another live agent holds it. If that agent died after claiming and before
                # its ``started`` reached the broker, this copy is the task's last: dropping
                # it would strand the task, queued, with nothing left to publish it. The
                # dispatcher, told, ignores a task that has started and republishes one that
                # has not, after a pause, until the holder's heartbeat has expired.
                await item.report_returned(messages.HELD_ELSEWHERE)
            await item.settle()
            self.stats.duplicates += 1
            self._log_task(
                logging.INFO, "duplicate delivery dropped", task, holder=claim.previous_holder
            )
            return Outcome.DUPLICATE
        if claim.outcome is Claim.CANCELLED:
            await item.settle()
            self.stats.cancelled_before_start += 1
            self._log_task(logging.INFO, "task cancelled before it started", task)
            return Outcome.CANCELLED
        self._held.add(key)
        if claim.previous_holder:
            self._log_task(
                logging.WARNING,
                "took over the lease of a dead agent",
                task,
                previous_holder=claim.previous_holder,
            )
        if self._intake.stopped:
            await self._abandon(task)
            await self._hand_back(item, "draining")
            return Outcome.HANDED_BACK
        attempt = Attempt(task)
        self.attempts.add(attempt)
        try:
            await self._emit(self._reporter.event(messages.Started, task))
            await item.settle()
            self.stats.started += 1
            started = time.monotonic()
            self._log_task(logging.DEBUG, "task started", task)
            event = await self._executor.execute(attempt)
        finally:
            self.attempts.remove(attempt)
            slot.release()  # the next task may start while this one reports
        if event is not None:
            await self._emit(event)
        outcome = attempt_outcome(event, attempt.stop_reason)
        self.stats.ran(outcome)
        self.metrics.ran(outcome, time.monotonic() - started)
        self.stats.finished += 1
        await self._release(task)
        return outcome

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
        connection = self._connection
        if not self._serving or connection is None:
            return "starting: connecting to RabbitMQ and Redis"
        if not connection_up(connection) or self._channel.is_closed:
            return "RabbitMQ connection lost: reconnecting"
        if self._heartbeat.failing:
            return "Redis unreachable: the heartbeat fails"
        # A saturated agent (intake paused, every slot busy) is ready: reporting it unready
        # would stall rolling updates exactly when the pool is busiest.
        return None

    def counters(self) -> Counters:
        """What the event publisher and the heartbeat counted (zero before they exist)."""
        if not self._wired:
            return Counters()
        return Counters(
            event_batches=self._publisher.published_batches,
            events=self._publisher.published_events,
            heartbeat_failures=self._heartbeat.failures,
        )

    # -- claims and leases -------------------------------------------------------------------

    async def _claim(self, task: messages.TaskMessage) -> ClaimResult | None:
        delay = 0.1
        while True:
            try:
                return await self._leases.claim(task.task_id, task.attempt)
            except (RedisError, OSError) as exc:
                if self._intake.stopped:
                    return None
                self._log_task(
                    logging.WARNING,
                    "cannot claim: Redis unreachable, retrying",
                    task,
                    error=str(exc),
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _release(self, task: messages.TaskMessage) -> None:
        key = (task.task_id, task.attempt)
        self._held.discard(key)
        self._own_claims.finished(key)
        try:
            await self._leases.release(*key)
        except (RedisError, OSError):
            self._leases.pending_releases.add(key)

    async def _abandon(self, task: messages.TaskMessage) -> None:
        """Give a claimed, unstarted attempt back: the next agent must be able to claim it."""
        key = (task.task_id, task.attempt)
        self._held.discard(key)
        try:
            await self._leases.abandon(*key)
        except (RedisError, OSError) as exc:
            self._log_task(logging.WARNING, "could not abandon the lease", task, error=str(exc))

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
        self._held.discard((task_id, attempt_no))
        attempt = self.attempts.get(task_id, attempt_no)
        if attempt is None or not attempt.stop(StopReason.LEASE_LOST):
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

    # -- broker helpers ----------------------------------------------------------------------

    async def _emit(self, event: messages.Event) -> None:
        await self._publisher.emit(event)

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        published = await dead_letter(
            self._dead_exchange,
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

    def _log_task(
        self, level: int, event: str, task: messages.TaskMessage, **fields: object
    ) -> None:
        self._log(level, event, task_id=task.task_id, attempt=task.attempt, **fields)


async def _first_of(events: Sequence[anyio.Event]) -> None:
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


def prefetch_for(concurrency: int) -> int:
    """Deliveries held unacked, each up to ``concurrency`` tasks once batches come: a quarter
    of the slots (at least 2, at most all), so a busy agent holds a few batches waiting, not
    ``concurrency`` of them. A delivery is acked as soon as its tasks start, so this bounds
    tasks waiting for a slot, not tasks running."""
    return min(concurrency, max(2, math.ceil(concurrency / 4)))


def _decode(body: bytes, batched: bool) -> tuple[list[messages.TaskMessage], list[str]]:
    """The tasks of a delivery and their ``traceparent``s (empty: in the message headers)."""
    if not batched:
        return [messages.decode_task(body)], []
    batch = messages.decode_task_batch(body)
    return batch.tasks, batch.traceparents


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
