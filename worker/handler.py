"""The agent's half of a task's life: from a delivery of the pool queue to a released lease.

For each delivery: verify and decode it (dead-letter what cannot be used); then for each task
it carries (one, or a batch): refuse expired and disallowed tasks, claim the lease, publish
``started`` and wait for the broker's confirm, settle it (the delivery is acked once all its
tasks are settled, ``delivery.py``), run, report the outcome, release the lease. The delivery
is never held during the run: from the ack on, the lease and the heartbeat carry the
responsibility for the attempt.

The :class:`TaskHandler` is built once every part it needs exists (the agent's lifecycle,
``agent.py``, builds them); its collaborators are the small protocols below, so tests drive it
with in-memory fakes as well as with the real broker and Redis.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio
import msgspec
from aio_pika.abc import AbstractIncomingMessage
from anyio.abc import TaskGroup
from redis.exceptions import RedisError

from rexec.schemas import messages, signing, tracing
from rexec.schemas.names import LEASE_RELEASED, LEASE_TOMBSTONE

from . import spans
from .allow import allowed, refusal, task_target
from .attempts import Attempt, Attempts, Outcome, attempt_outcome
from .delivery import DeliveredTask, Delivery, requeue
from .leases import Claim, ClaimResult, OwnClaims
from .metrics import AgentMetrics
from .reports import Reporter
from .status import AgentStats

log = logging.getLogger("rexec.agent")

Emit = Callable[[messages.Event], Awaitable[None]]
DeadLetter = Callable[[AbstractIncomingMessage, str], Awaitable[None]]
"""Parks an unusable delivery with the reason, then settles it."""


class Slot(Protocol):
    def release(self) -> None: ...


class Slots(Protocol):
    """The intake: a slot per running attempt; ``stopped`` once the drain began."""

    @property
    def stopped(self) -> bool: ...

    async def acquire(self) -> Slot | None: ...


class Leases(Protocol):
    """The lease store in Redis (``leases.py``)."""

    pending_releases: set[tuple[str, int]]

    async def claim(self, task_id: str, attempt: int) -> ClaimResult: ...

    async def release(self, task_id: str, attempt: int) -> None: ...

    async def abandon(self, task_id: str, attempt: int) -> None: ...


class Runner(Protocol):
    """Runs an attempt to its terminal event (None: it is no longer ours to report)."""

    async def execute(self, attempt: Attempt) -> messages.TaskEvent | None: ...


class TaskHandler:
    """Handles the deliveries of one agent, each task from refusal or claim to release."""

    def __init__(
        self,
        *,
        agent_id: str,
        pool: str,
        allow: Sequence[str],
        verifier: signing.Verifier,
        slots: Slots,
        emit: Emit,
        leases: Leases,
        runner: Runner,
        dead_letter: DeadLetter,
        reporter: Reporter,
        attempts: Attempts,
        stats: AgentStats,
        metrics: AgentMetrics | None = None,
        own_claims: OwnClaims | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.pool = pool
        self.allow = list(allow)
        self.verifier = verifier
        self.slots = slots
        self.emit = emit
        self.leases = leases
        self.runner = runner
        self.dead_letter = dead_letter
        self.reporter = reporter
        self.attempts = attempts
        self.stats = stats
        self.metrics = metrics
        self.own_claims = own_claims if own_claims is not None else OwnClaims()
        self._busy = 0
        self._idle = anyio.Event()
        self._idle.set()

    # -- in-flight accounting, for the drain ---------------------------------------------

    @property
    def busy(self) -> int:
        """Deliveries and batch tasks being handled right now."""
        return self._busy

    def _enter(self) -> None:
        self._busy += 1
        if self._idle.is_set():
            self._idle = anyio.Event()

    def _leave(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once nothing is being handled."""
        while self._busy:
            await self._idle.wait()

    # -- deliveries ----------------------------------------------------------------------

    def start(self, message: AbstractIncomingMessage, work: TaskGroup) -> None:
        """Handle ``message`` in ``work``; counted busy from now on."""
        self._enter()
        work.start_soon(self._handle_guarded, message, work)

    async def _handle_guarded(self, message: AbstractIncomingMessage, work: TaskGroup) -> None:
        try:
            await self.handle(message, work)
        except Exception:
            log.exception(
                "unexpected error handling a delivery; returning it unless already acked",
                extra={"agent_id": self.agent_id},
            )
            await requeue(message)
        finally:
            self._leave()

    async def handle(self, message: AbstractIncomingMessage, work: TaskGroup) -> None:
        """Check the delivery as a whole (signature, format, pool), then handle each task:
        a batch's tasks side by side, each in a handler of its own."""
        self.stats.deliveries += 1
        try:
            self.verifier.verify(
                message.body, (message.headers or {}).get(signing.SIGNATURE_HEADER)
            )
        except signing.SignatureError as exc:
            await self.dead_letter(message, f"refused: {exc}")
            return
        batched = message.type == messages.TASK_BATCH_TYPE
        try:
            tasks, traceparents = decode(message.body, batched)
            for task in tasks:
                if task.pool != self.pool:
                    raise messages.MessageError(
                        f"task {task.task_id} is for pool {task.pool!r}, but it reached the "
                        f"queue of pool {self.pool!r}"
                    )
        except messages.MessageError as exc:
            await self.dead_letter(message, str(exc))
            return
        self.stats.received += len(tasks)
        delivery = Delivery(message, batched=batched, emit=self.emit, agent_id=self.agent_id)
        if self.slots.stopped:  # draining: give every task back, none started
            items = [delivery.task(task, message.headers) for task in tasks]
            for item in items:
                await self._hand_back(item, "draining")
            return
        if not batched:
            await self.handle_task(delivery.task(tasks[0], message.headers))
            return
        items = [
            delivery.task(task, {"traceparent": tp} if tp else None)
            for task, tp in zip(tasks, traceparents or [""] * len(tasks), strict=True)
        ]
        for item in items:
            self._enter()
            work.start_soon(self._handle_task_guarded, item)

    async def _handle_task_guarded(self, item: DeliveredTask) -> None:
        try:
            await self.handle_task(item)
        except Exception:
            log.exception(
                "unexpected error handling a task of a batch; handing it back unless started",
                extra={"agent_id": self.agent_id, "task_id": item.task.task_id},
            )
            if not item.settled:  # not started: let the next agent claim it
                await self._abandon(item.task)
            await item.hand_back("agent_error")
        finally:
            self._leave()

    # -- one task ------------------------------------------------------------------------

    async def handle_task(self, item: DeliveredTask) -> None:
        task = item.task
        if task.expires_at is not None and task.expires_at <= time.time():
            await self._finish_unstarted(item, self.reporter.event(messages.Expired, task))
            self.stats.expired += 1
            self._log_task(logging.INFO, "task expired before it started", task)
            return
        refused = self._refusal(task)
        if refused is not None:
            await self._finish_unstarted(item, refused)
            self.stats.not_allowed += 1
            self._log_task(logging.WARNING, "task refused", task, reason=refused.message)
            return
        slot = await self.slots.acquire()
        if slot is None:
            await self._hand_back(item, "draining" if self.slots.stopped else "no_slot")
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
            return self.reporter.failed(
                task, "InvalidTask", "command task with an empty argv", retryable=False
            )
        target = task_target(task)
        if not allowed(target, self.allow):
            return self.reporter.failed(
                task, "TargetNotAllowed", refusal(target, self.allow), retryable=False
            )
        return None

    async def _finish_unstarted(self, item: DeliveredTask, event: messages.Event) -> None:
        await self.emit(event)
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
        self.own_claims.claiming(key)
        try:
            claim = await self._claim(task)
        finally:
            self.own_claims.claimed(key)
        if (
            claim is not None
            and claim.outcome is Claim.DUPLICATE
            and claim.previous_holder == self.agent_id
            and self.own_claims.is_lost_reply(key, self.attempts.held)
        ):
            self._log_task(logging.WARNING, "claim answered late: the lease is ours", task)
            claim = ClaimResult(Claim.CLAIMED, "")
        if claim is None:  # draining while Redis was unreachable
            await self._hand_back(item, "draining")
            return Outcome.HANDED_BACK
        if claim.outcome is Claim.DUPLICATE:
            holder = claim.previous_holder
            if holder not in (self.agent_id, LEASE_TOMBSTONE) and not holder.startswith(
                LEASE_RELEASED
            ):
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
        self.attempts.held.add(key)
        if claim.previous_holder:
            self._log_task(
                logging.WARNING,
                "took over the lease of a dead agent",
                task,
                previous_holder=claim.previous_holder,
            )
        if self.slots.stopped:
            await self._abandon(task)
            await self._hand_back(item, "draining")
            return Outcome.HANDED_BACK
        attempt = Attempt(task)
        self.attempts.add(attempt)
        try:
            await self.emit(self.reporter.event(messages.Started, task, fence=claim.fence))
            await item.settle()
            self.stats.started += 1
            started = time.monotonic()
            self._log_task(logging.DEBUG, "task started", task)
            try:
                event = await self.runner.execute(attempt)
            except Exception as exc:  # a bug of ours must still end the attempt and its lease
                log.exception(
                    "agent error after the attempt started",
                    extra={"task_id": task.task_id, "attempt": task.attempt},
                )
                event = self.reporter.failed(
                    task,
                    "AgentError",
                    f"the agent failed while running the attempt: {exc!r}",
                    retryable=True,
                    traceback=traceback.format_exc(),
                )
        finally:
            self.attempts.remove(attempt)
            slot.release()  # the next task may start while this one reports
        if event is not None:
            await self.emit(msgspec.structs.replace(event, fence=claim.fence))
        outcome = attempt_outcome(event, attempt.stop_reason)
        self.stats.ran(outcome)
        if self.metrics is not None:
            self.metrics.ran(outcome, time.monotonic() - started)
        self.stats.finished += 1
        await self._release(task)
        return outcome

    # -- leases --------------------------------------------------------------------------

    async def _claim(self, task: messages.TaskMessage) -> ClaimResult | None:
        delay = 0.1
        while True:
            try:
                return await self.leases.claim(task.task_id, task.attempt)
            except (RedisError, OSError) as exc:
                if self.slots.stopped:
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
        self.attempts.held.discard(key)
        self.own_claims.finished(key)
        try:
            await self.leases.release(*key)
        except (RedisError, OSError):
            self.leases.pending_releases.add(key)

    async def _abandon(self, task: messages.TaskMessage) -> None:
        """Give a claimed, unstarted attempt back: the next agent must be able to claim it."""
        key = (task.task_id, task.attempt)
        self.attempts.held.discard(key)
        try:
            await self.leases.abandon(*key)
        except (RedisError, OSError) as exc:
            self._log_task(logging.WARNING, "could not abandon the lease", task, error=str(exc))

    def _log_task(
        self, level: int, event: str, task: messages.TaskMessage, **fields: object
    ) -> None:
        log.log(
            level,
            event,
            extra={
                "agent_id": self.agent_id,
                "pool": self.pool,
                "task_id": task.task_id,
                "attempt": task.attempt,
                **fields,
            },
        )


def decode(body: bytes, batched: bool) -> tuple[list[messages.TaskMessage], list[str]]:
    """The tasks of a delivery and their ``traceparent``s (empty: in the message headers)."""
    if not batched:
        return [messages.decode_task(body)], []
    batch = messages.decode_task_batch(body)
    return batch.tasks, batch.traceparents
