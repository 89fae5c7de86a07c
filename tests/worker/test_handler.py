"""The agent's per-task protocol (``TaskHandler``) against in-memory fakes of the intake, the
event publisher and the lease store, as dramatiq's ``StubBroker`` tests a worker without a
broker. The same paths run against RabbitMQ and Redis in ``test_lifecycle`` and friends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import pytest
from aio_pika.abc import AbstractIncomingMessage

from rexec.schemas import messages, signing
from rexec.schemas.signing import SIGNATURE_HEADER
from rexec.worker.attempts import Attempt, Attempts
from rexec.worker.handler import TaskHandler
from rexec.worker.leases import Claim, ClaimResult
from rexec.worker.reports import Reporter
from rexec.worker.status import AgentStats
from tests.support import SIGNER
from tests.worker.harness import task

pytestmark = pytest.mark.anyio

POOL = "stub"
AGENT = "agent-a"


@dataclass
class FakeMessage:
    """What the handler reads of an AMQP delivery, and how it was settled."""

    body: bytes
    type: str = messages.TASK_TYPE
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str = "application/json"
    settled: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append("requeue" if requeue else "nack")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append("reject-requeue" if requeue else "reject")


class FakeSlot:
    def __init__(self, slots: FakeSlots) -> None:
        self._slots = slots
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._slots.free += 1


class FakeSlots:
    def __init__(self, free: int = 4) -> None:
        self.free = free
        self.stopped = False

    async def acquire(self) -> FakeSlot | None:
        if self.stopped or self.free == 0:
            return None
        self.free -= 1
        return FakeSlot(self)


class FakeLeases:
    """Claims succeed unless ``answers`` says otherwise for that (task, attempt)."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, int], ClaimResult] = {}
        self.claimed: list[tuple[str, int]] = []
        self.released: list[tuple[str, int]] = []
        self.abandoned: list[tuple[str, int]] = []
        self.pending_releases: set[tuple[str, int]] = set()

    async def claim(self, task_id: str, attempt: int) -> ClaimResult:
        self.claimed.append((task_id, attempt))
        return self.answers.get((task_id, attempt), ClaimResult(Claim.CLAIMED, ""))

    async def release(self, task_id: str, attempt: int) -> None:
        self.released.append((task_id, attempt))

    async def abandon(self, task_id: str, attempt: int) -> None:
        self.abandoned.append((task_id, attempt))


class FakeRunner:
    """Succeeds each attempt with its args' sum, or runs ``during`` first (a lease loss)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.ran: list[str] = []
        self.during: Callable[[Attempt], None] | None = None

    async def execute(self, attempt: Attempt) -> messages.TaskEvent | None:
        self.ran.append(attempt.task.task_id)
        if self.during is not None:
            self.during(attempt)
        if attempt.stop_reason is not None:
            return None  # the lease is not ours: report nothing
        return self.reporter.event(messages.Succeeded, attempt.task, result=sum(attempt.task.args))


@dataclass
class Stub:
    handler: TaskHandler
    slots: FakeSlots
    leases: FakeLeases
    runner: FakeRunner
    attempts: Attempts
    stats: AgentStats
    events: list[messages.Event]
    dead: list[tuple[FakeMessage, str]]

    async def deliver(self, message: FakeMessage) -> None:
        async with anyio.create_task_group() as work:
            self.handler.start(cast(AbstractIncomingMessage, message), work)
        assert self.handler.busy == 0

    def kinds(self, task_id: str) -> list[str]:
        return [
            type(e).__name__
            for e in self.events
            if isinstance(e, messages.TaskEvent | messages.Returned) and e.task_id == task_id
        ]


@asynccontextmanager
async def stub() -> AsyncIterator[Stub]:
    reporter = Reporter(AGENT)
    events: list[messages.Event] = []
    dead: list[tuple[FakeMessage, str]] = []

    async def emit(event: messages.Event) -> None:
        events.append(event)

    async def dead_letter(message: AbstractIncomingMessage, reason: str) -> None:
        dead.append((cast(FakeMessage, message), reason))
        await message.ack()

    slots, leases, runner = FakeSlots(), FakeLeases(), FakeRunner(reporter)
    attempts, stats = Attempts(), AgentStats()
    handler = TaskHandler(
        agent_id=AGENT,
        pool=POOL,
        allow=["tests.tasks:*"],
        verifier=signing.Verifier([SIGNER.public_key]),
        slots=slots,
        emit=emit,
        leases=leases,
        runner=runner,
        dead_letter=dead_letter,
        reporter=reporter,
        attempts=attempts,
        stats=stats,
    )
    yield Stub(handler, slots, leases, runner, attempts, stats, events, dead)


def signed(body: bytes, **fields: Any) -> FakeMessage:
    return FakeMessage(body, headers={SIGNATURE_HEADER: SIGNER.sign(body)}, **fields)


def one(message: messages.TaskMessage) -> FakeMessage:
    return signed(messages.encode(message))


def batch(*tasks: messages.TaskMessage) -> FakeMessage:
    body = messages.encode(messages.TaskBatch(tasks=list(tasks)))
    return signed(body, type=messages.TASK_BATCH_TYPE)


async def test_a_task_is_claimed_started_acked_run_reported_and_released() -> None:
    async with stub() as s:
        t = task(POOL)
        message = one(t)
        await s.deliver(message)
    assert s.kinds(t.task_id) == ["Started", "Succeeded"]
    assert message.settled == ["ack"]
    assert s.leases.released == [(t.task_id, 1)]
    assert s.attempts.held == set()
    assert (s.stats.started, s.stats.succeeded, s.stats.finished) == (1, 1, 1)


async def test_an_agent_error_after_started_fails_the_attempt_retryably_and_releases() -> None:
    """Issue 20, item 9: an exception of the agent's own after ``started`` (a bug in the
    runner, say) left the lease held and the task ``running`` until the agent died."""

    def broken(attempt: Attempt) -> None:
        raise RuntimeError("a bug in the runner")

    async with stub() as s:
        t = task(POOL)
        s.runner.during = broken
        await s.deliver(one(t))
    assert s.kinds(t.task_id) == ["Started", "Failed"]
    [failed] = [e for e in s.events if isinstance(e, messages.Failed)]
    assert (failed.error_type, failed.retryable) == ("AgentError", True)
    assert "a bug in the runner" in failed.message
    assert s.leases.released == [(t.task_id, 1)]
    assert s.attempts.held == set()


async def test_a_lost_lease_stops_the_attempt_reports_nothing_and_releases() -> None:
    async with stub() as s:
        t = task(POOL)
        s.runner.during = lambda attempt: s.attempts.lease_lost(t.task_id, t.attempt) or None
        await s.deliver(one(t))
    assert s.kinds(t.task_id) == ["Started"]  # no terminal event: it is not ours any more
    assert s.attempts.held == set()
    assert s.stats.succeeded == 0 and s.stats.finished == 1


async def test_a_duplicate_held_by_another_live_agent_is_reported_returned_and_dropped() -> None:
    async with stub() as s:
        t = task(POOL)
        s.leases.answers[(t.task_id, 1)] = ClaimResult(Claim.DUPLICATE, "agent-b")
        message = one(t)
        await s.deliver(message)
    returned = [e for e in s.events if isinstance(e, messages.Returned)]
    assert [r.reason for r in returned] == [messages.HELD_ELSEWHERE]
    assert message.settled == ["ack"]
    assert s.runner.ran == [] and s.stats.duplicates == 1


async def test_a_redelivery_of_an_attempt_we_ran_is_dropped_without_a_word() -> None:
    async with stub() as s:
        t = task(POOL)
        await s.deliver(one(t))
        s.leases.answers[(t.task_id, 1)] = ClaimResult(Claim.DUPLICATE, AGENT)
        again = one(t)
        await s.deliver(again)
    assert s.kinds(t.task_id) == ["Started", "Succeeded"]  # once, from the first delivery
    assert again.settled == ["ack"] and s.stats.duplicates == 1


async def test_a_late_reply_to_our_own_claim_is_taken_as_ours() -> None:
    """Redis applied our claim but the reply was lost; the retry sees our own lease."""
    async with stub() as s:
        t = task(POOL)
        s.leases.answers[(t.task_id, 1)] = ClaimResult(Claim.DUPLICATE, AGENT)
        await s.deliver(one(t))
    assert s.kinds(t.task_id) == ["Started", "Succeeded"]
    assert s.stats.duplicates == 0


async def test_a_task_cancelled_before_it_started_is_settled_and_not_run() -> None:
    async with stub() as s:
        t = task(POOL)
        s.leases.answers[(t.task_id, 1)] = ClaimResult(Claim.CANCELLED, "")
        await s.deliver(one(t))
    assert s.runner.ran == [] and s.stats.cancelled_before_start == 1


async def test_without_a_free_slot_each_task_is_reported_returned_and_acked() -> None:
    """Not requeued: a requeue would spend the pool queue's delivery limit."""
    async with stub() as s:
        s.slots.free = 0
        single = one(task(POOL))
        await s.deliver(single)
        a, b = task(POOL), task(POOL)
        both = batch(a, b)
        await s.deliver(both)
    assert single.settled == ["ack"]
    assert [e.reason for e in s.events if isinstance(e, messages.Returned)] == ["no_slot"] * 3
    assert both.settled == ["ack"]  # acked once both are settled (reported returned)
    assert s.leases.claimed == [] and s.stats.handed_back == 3


async def test_a_draining_handler_hands_back_what_it_receives() -> None:
    async with stub() as s:
        s.slots.stopped = True
        single = one(task(POOL))
        await s.deliver(single)
        both = batch(task(POOL), task(POOL))
        await s.deliver(both)
    assert single.settled == ["ack"] and both.settled == ["ack"]
    assert [e.reason for e in s.events if isinstance(e, messages.Returned)] == ["draining"] * 3
    assert s.leases.claimed == [] and s.stats.handed_back == 3


async def test_each_task_of_a_batch_runs_and_the_delivery_is_acked_once() -> None:
    async with stub() as s:
        tasks = [task(POOL, args=[i, 1]) for i in range(3)]
        message = batch(*tasks)
        await s.deliver(message)
    assert message.settled == ["ack"]
    assert sorted(s.runner.ran) == sorted(t.task_id for t in tasks)
    results = {e.task_id: e.result for e in s.events if isinstance(e, messages.Succeeded)}
    assert results == {t.task_id: t.args[0] + 1 for t in tasks}
    assert s.stats.received == 3 and s.stats.deliveries == 1


async def test_a_batch_with_a_task_already_held_elsewhere_runs_the_rest() -> None:
    async with stub() as s:
        held, free = task(POOL), task(POOL)
        s.leases.answers[(held.task_id, 1)] = ClaimResult(Claim.DUPLICATE, "agent-b")
        message = batch(held, free)
        await s.deliver(message)
    assert s.kinds(held.task_id) == ["Returned"]
    assert s.kinds(free.task_id) == ["Started", "Succeeded"]
    assert message.settled == ["ack"]


async def test_unusable_deliveries_are_dead_lettered_with_the_reason() -> None:
    async with stub() as s:
        unsigned = FakeMessage(messages.encode(task(POOL)))
        other_pool = one(task("elsewhere"))
        garbage = signed(b"{not json")
        for message in (unsigned, other_pool, garbage):
            await s.deliver(message)
    reasons = [reason for _, reason in s.dead]
    assert reasons[0].startswith("refused:")
    assert "pool 'elsewhere'" in reasons[1] and f"pool {POOL!r}" in reasons[1]
    assert len(reasons) == 3
    assert s.runner.ran == [] and s.stats.deliveries == 3


async def test_a_disallowed_or_expired_task_is_reported_and_never_claimed() -> None:
    async with stub() as s:
        refused = task(POOL, "os:system")
        expired = task(POOL, expires_at=1.0)
        await s.deliver(one(refused))
        await s.deliver(one(expired))
    assert s.kinds(refused.task_id) == ["Failed"]
    assert s.kinds(expired.task_id) == ["Expired"]
    assert s.leases.claimed == [] and (s.stats.not_allowed, s.stats.expired) == (1, 1)
