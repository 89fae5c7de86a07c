"""The dead-letter consumer: a task message that died must not leave its task ``queued``.

Task messages reach ``rexec.dead.<pool>`` two ways: the broker moves one there once the pool
queue returned it past its ``x-delivery-limit`` (deliveries held by agents that crashed, were
cut off, or lost their broker), and an agent parks one it cannot use, with the reason in
``x-rexec-reason`` (a bad signature during a key rotation, the wrong pool, a malformed body).
Nothing else would ever publish that attempt again, so each task the message carries that is
still ``queued`` at that attempt goes through the state machine (``statemachine.
on_dead_letter``): published again, or ended ``failed`` with the reason, in its history and
the change feed like any transition.

A dead letter is acked only once its effect is committed, so a crash replays it (the state
machine then finds the task moved on). One that is no task message, names unknown tasks, or
whose handling raises is logged and acked: it is dead already, and must not stop the loop.
A broker or database outage ends the channel and the loop backs off (``outages.LoopHealth``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from anyio.abc import ObjectReceiveStream
from sqlalchemy import select

from rexec.schemas import messages, names, signing

from . import statemachine, topology, transitions
from .db.models import Pool
from .events import discard_channel, outage
from .outages import LoopHealth
from .runtime import Runtime

log = logging.getLogger("rexec.deadletters")

PREFETCH = 50
POOL_REFRESH = 5.0
"""Seconds between looks for pools created since (their dead queues are consumed from then)."""
REASON_LIMIT = 500
"""Characters of a reason kept in a task's history."""
AGENT_HEADER = names.DEAD_LETTER_AGENT_HEADER

_json = msgspec.json.Encoder()


async def run_dead_letters(rt: Runtime) -> None:
    """Consume every pool's dead queue forever, reopening the channel after an outage."""
    health = LoopHealth("dead-letter consumer", log)
    while True:
        try:
            await _consume(rt, health)
        except Exception as exc:
            log.info("dead-letter consumer lost its channel, reopening", extra={"error": str(exc)})
            await health.wait(exc)


async def _consume(rt: Runtime, health: LoopHealth) -> None:
    channel = rt.connection.channel()
    try:
        await channel.initialize()
        await channel.set_qos(prefetch_count=PREFETCH)
        send, receive = anyio.create_memory_object_stream[AbstractIncomingMessage](math.inf)

        async def on_message(message: AbstractIncomingMessage) -> None:
            send.send_nowait(message)

        consumed: set[str] = set()
        verifier = signing.Verifier(rt.public_keys)
        while True:
            await _follow_pools(rt, channel, consumed, on_message)
            health.ok()
            refresh_at = anyio.current_time() + POOL_REFRESH
            while (message := await _next(receive, refresh_at)) is not None:
                await _handle(rt, channel, verifier, message)  # never cut short by the refresh
                health.ok()
    finally:
        await discard_channel(channel)


async def _next(
    receive: ObjectReceiveStream[AbstractIncomingMessage], until: float
) -> AbstractIncomingMessage | None:
    """The next dead letter, or None once ``until`` (time to look for new pools) passed."""
    with anyio.move_on_after(max(0.0, until - anyio.current_time())):
        return await receive.receive()
    return None


async def _follow_pools(
    rt: Runtime,
    channel: AbstractChannel,
    consumed: set[str],
    on_message: Callable[[AbstractIncomingMessage], Awaitable[None]],
) -> None:
    """Start consuming the dead queues of pools not consumed yet (declaring any that went
    missing: without it the broker would drop that pool's dead letters)."""
    async with rt.sessions() as session:
        pools = set(await session.scalars(select(Pool.name)))
    # A pool named like the events' dead queue shares it: those are the operator's to read.
    for pool in sorted(pools - consumed - {names.DEAD_EVENTS_ROUTING_KEY}):
        queue = await topology.declare_dead_queue(channel, pool)
        await queue.consume(on_message)
        consumed.add(pool)


async def _handle(
    rt: Runtime,
    channel: AbstractChannel,
    verifier: signing.Verifier,
    message: AbstractIncomingMessage,
) -> None:
    """Reconcile one dead letter, then ack it; only an outage leaves it unacked (raised)."""
    try:
        await reconcile(rt, verifier, message)
    except Exception as exc:
        if outage(rt, channel, exc):
            raise
        rt.metrics.dead_letters.labels("error").inc()
        log.exception(
            "could not reconcile a dead letter; acked, left as it is",
            extra={"message_id": message.message_id, "queue": message.routing_key},
        )
    await message.ack()


async def reconcile(
    rt: Runtime, verifier: signing.Verifier, message: AbstractIncomingMessage
) -> None:
    """Apply what one dead task message means to the tasks it carries, in one transaction."""
    headers = message.headers or {}
    tasks = _tasks(message)
    if tasks is None:
        rt.metrics.dead_letters.labels("not_a_task").inc()
        log.warning(
            "a dead letter that is no task message: acked",
            extra={"message_id": message.message_id, "headers": _printable(headers)},
        )
        return
    signed = _signed(verifier, message)
    retryable, reason = cause(headers)
    if not signed:
        reason += (
            "; not signed by this plane's keys (a forgery, or a key retired since): "
            "the attempt is published again, signed"
        )
    reason = reason[:REASON_LIMIT]
    error_json = _json.encode({"type": "DeadLettered", "message": reason}).decode()
    now = time.time()
    outcomes: dict[str, str] = {}
    retried = False
    writer = transitions.BatchWriter()
    async with rt.sessions.begin() as session:
        rows = await transitions.lock_rows(session, {t.task_id for t in tasks})
        for task in tasks:
            row = rows.get(task.task_id)
            if row is None:
                outcomes[task.task_id] = "unknown_task"
                continue
            dead = statemachine.DeadLetter(task.attempt, reason, retryable, signed)
            decision = statemachine.on_dead_letter(transitions.snapshot(row), dead)
            if not isinstance(decision, statemachine.Transition):
                outcomes[task.task_id] = decision.reason
                continue
            writer.add(row, transitions.plan(row, decision, now, error_json=error_json))
            outcomes[task.task_id] = "republished" if decision.retry_in is not None else "failed"
            retried = retried or decision.retry_in is not None
        await writer.flush(session)
    _report(rt, tasks, outcomes, reason, signed)
    if writer.transitions:
        rt.notify_applied()
    if retried:
        rt.wake_relay()


def cause(headers: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the death leaves the task blameless (the broker's delivery limit), and the
    reason a task's history keeps: the agent's, or the broker's ``x-death`` record."""
    agent_reason = headers.get(names.REASON_HEADER)
    if agent_reason is not None:
        agent = _text(headers.get(AGENT_HEADER)) or "unknown"
        return False, f"dead_lettered by agent {agent}: {_text(agent_reason)}"
    deaths = headers.get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths else None
    if not isinstance(death, Mapping):
        return False, "dead_lettered: no x-death record (published to rexec.dead by hand?)"
    why = _text(death.get("reason"))
    record = f"x-death: reason={why}, queue={_text(death.get('queue'))}, count={death.get('count')}"
    if why == "delivery_limit":
        return True, f"dead_lettered: delivery limit reached ({record})"
    return False, f"dead_lettered: {why} ({record})"


def _tasks(message: AbstractIncomingMessage) -> list[messages.TaskMessage] | None:
    """The tasks of a task message or batch (an agent's copy may not say which it is)."""
    kinds = {messages.TASK_TYPE: [False], messages.TASK_BATCH_TYPE: [True]}
    for batched in kinds.get(message.type or "", [False, True]):
        try:
            if batched:
                return messages.decode_task_batch(message.body).tasks
            return [messages.decode_task(message.body)]
        except messages.MessageError:
            continue
    return None


def _signed(verifier: signing.Verifier, message: AbstractIncomingMessage) -> bool:
    try:
        verifier.verify(message.body, (message.headers or {}).get(signing.SIGNATURE_HEADER))
    except signing.SignatureError:
        return False
    return True


def _report(
    rt: Runtime,
    tasks: list[messages.TaskMessage],
    outcomes: dict[str, str],
    reason: str,
    signed: bool,
) -> None:
    republished = sum(o == "republished" for o in outcomes.values())
    if republished:
        rt.metrics.requeues.labels("dead_lettered").inc(republished)
    for task in tasks:
        outcome = outcomes[task.task_id]
        rt.metrics.dead_letters.labels(outcome).inc()
        level = logging.WARNING if outcome in ("republished", "failed") else logging.INFO
        log.log(
            level,
            "dead-lettered task message reconciled",
            extra={
                "task_id": task.task_id,
                "attempt": task.attempt,
                "pool": task.pool,
                "outcome": outcome,
                "reason": reason,
                "signed": signed,
            },
        )


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def _printable(headers: Mapping[str, Any]) -> dict[str, str]:
    return {k: _text(v)[:200] for k, v in headers.items() if k != signing.SIGNATURE_HEADER}
