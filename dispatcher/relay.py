"""The outbox relay: publishes committed attempts to their pool's queue, then forgets them.

The API commits a task and its outbox row together; the relay publishes persistent messages
with publisher confirms and ``mandatory`` (an unroutable pool is an error, not a silent drop),
and deletes the outbox rows only after the broker confirmed. A crash in between publishes the
same attempt again; agents recognise the duplicate by its lease. The rows it reads (``Due``)
and the task message each becomes are in ``outbox.py``, which the direct publisher shares.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import aio_pika
import anyio
from aio_pika.abc import AbstractExchange
from aio_pika.exceptions import DeliveryError
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pamqp.commands import Basic
from pamqp.common import FieldValue
from sqlalchemy import delete, func, select

from rexec.schemas import messages, names, signing, tracing

from . import limits
from .db.models import Outbox, Pool, Task
from .outages import LoopHealth
from .outbox import DUE_COLUMNS, Due, task_message
from .runtime import BROKER_ERRORS, Runtime

log = logging.getLogger("rexec.relay")

BATCH_SIZE = 500
IDLE_POLL = 1.0
"""Seconds between looks at the outbox when nothing woke the relay (other replicas, retries)."""


async def run_relay(rt: Runtime) -> None:
    """Publish due rows forever. A round that fails (broker or database away, or a bug) is
    logged and tried again after a backoff: nothing a round meets ends the dispatcher."""
    await rt.tasks_exchange()  # a missing exchange fails start-up, not the first round
    health = LoopHealth("relay", log)
    while True:
        rt.relay_wakeup = anyio.Event()
        try:
            published, next_due = await relay_once(rt, await rt.tasks_exchange())
        except Exception as exc:
            await health.wait(exc)
            continue
        health.ok()
        if published >= BATCH_SIZE:
            continue
        wait = IDLE_POLL if next_due is None else max(0.0, min(IDLE_POLL, next_due - time.time()))
        with anyio.move_on_after(wait):
            await rt.relay_wakeup.wait()


async def relay_once(rt: Runtime, exchange: AbstractExchange) -> tuple[int, float | None]:
    """Publish one batch of due outbox rows; return how many, and when the next one is due."""
    now = time.time()
    async with rt.sessions() as session:
        await rt.batch_sizes.refresh(session)
        # Pools at their max_running are left out; the others get at most their free slots.
        slots = await limits.free_slots(session)
        full = [pool for pool, free in slots.items() if free <= 0]
        result = await session.execute(
            select(*DUE_COLUMNS)
            .select_from(Outbox)
            .join(Task, Task.id == Outbox.task_id)
            .join(Pool, Pool.name == Task.pool)
            .where(Outbox.available_at <= now, Pool.draining.is_(False), Pool.name.not_in(full))
            .order_by(Outbox.id)
            .limit(BATCH_SIZE)
        )
        rows = [Due._make(row) for row in result]
        next_due = None
        if len(rows) < BATCH_SIZE:
            next_due = await session.scalar(
                select(func.min(Outbox.available_at))
                .join(Task, Task.id == Outbox.task_id)
                .join(Pool, Pool.name == Task.pool)
                .where(Outbox.available_at > now, Pool.draining.is_(False))
            )
    fetched = len(rows)
    rows, held = limits.within(rows, slots)
    if held or full:
        next_due = min(next_due or now + limits.HELD_POLL, now + limits.HELD_POLL)
    if not rows:
        return 0, next_due
    confirmed, failure = await publish(rt, exchange, [due for due in rows if due.live])
    done = [due.outbox_id for due in confirmed]
    done.extend(due.outbox_id for due in rows if not due.live)
    if done:
        async with rt.sessions.begin() as session:
            await session.execute(delete(Outbox).where(Outbox.id.in_(done)))
    if failure is not None:
        raise failure  # after forgetting what was confirmed: the caller backs off and retries
    return fetched, next_due


async def publish(
    rt: Runtime, exchange: AbstractExchange, rows: Sequence[Due]
) -> tuple[list[Due], Exception | None]:
    """Publish concurrently (confirms pipeline), several attempts of a pool per message where
    its agents take batches; return the rows the broker confirmed, and the first broker
    error if some publishes failed (their rows stay in the outbox).

    Each publish catches its own broker error: raised inside the task group, it would come out
    as an ``ExceptionGroup`` that no ``except`` of the caller matches, and end the dispatcher.
    """
    confirmed: list[Due] = []
    unroutable: set[str] = set()
    failures: list[Exception] = []
    nacked: list[Exception] = []

    async def one(batch: list[Due]) -> None:
        first = batch[0]
        with _send_spans(batch) as traceparents:
            message = _message(rt, batch, traceparents)
            try:
                await exchange.publish(message, routing_key=first.pool, mandatory=True)
            except DeliveryError as exc:
                if isinstance(exc.frame, Basic.Nack):  # refused, not returned: retry elsewhere
                    failures.append(exc)
                    nacked.append(exc)
                else:
                    unroutable.add(first.pool)
                return
            except BROKER_ERRORS as exc:  # broker gone or channel being restored
                failures.append(exc)
                return
        confirmed.extend(batch)
        rt.metrics.task_messages.labels(first.pool).inc()
        rt.metrics.attempts_published.labels(first.pool).inc(len(batch))

    async with anyio.create_task_group() as tg:
        for batch in rt.batch_sizes.split(rows):
            tg.start_soon(one, batch)
    if nacked:
        log.warning(
            "the broker nacked publishes: renewing the channel", extra={"nacked": len(nacked)}
        )
        try:
            await rt.renew_channel()
        except BROKER_ERRORS as exc:
            log.warning("could not renew the channel", extra={"error": repr(exc)})
    if failures:
        return confirmed, failures[0]
    for pool in unroutable:
        # The pool's queue is gone (deleted by hand?): declare it again; the rows stay for the next round.
        log.error("pool queue missing, declaring it again", extra={"pool": pool})
        await rt.declare_pool(pool)
    return confirmed, None


def _message(rt: Runtime, batch: list[Due], traceparents: list[str]) -> aio_pika.Message:
    """One attempt as a ``TaskMessage`` (its trace context in the headers), several as a
    ``TaskBatch`` (theirs in the body). Either is signed whole, once."""
    first = batch[0]
    headers: dict[str, FieldValue] = {}
    if len(batch) == 1:
        body = messages.encode(task_message(first, first.attempt))
        kind, message_id = messages.TASK_TYPE, f"{first.id}:{first.attempt}"
        if traceparents:
            headers["traceparent"] = traceparents[0]
    else:
        tasks = [task_message(due, due.attempt) for due in batch]
        body = messages.encode(messages.TaskBatch(tasks=tasks, traceparents=traceparents))
        kind, message_id = messages.TASK_BATCH_TYPE, f"{first.id}:{first.attempt}+{len(batch) - 1}"
    headers[signing.SIGNATURE_HEADER] = rt.signer.sign(body)
    return aio_pika.Message(
        body,
        headers=headers,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        type=kind,
        timestamp=time.time(),
    )


@contextmanager
def _send_spans(batch: list[Due]) -> Iterator[list[str]]:
    """Each attempt's ``send`` span, child of its task's ``create`` span, open while the
    message is published; yields their W3C ``traceparent``s for the message. Nothing at all
    (an empty list) when tracing is off."""
    if not tracing.active():
        yield []
        return
    tracer = tracing.tracer("rexec.dispatcher")
    spans = []
    traceparents: list[str] = []
    for due in batch:
        attributes = tracing.messaging_attributes(
            names.TASKS_EXCHANGE, "send", f"{due.id}:{due.attempt}"
        )
        attributes.update(
            {
                "messaging.rabbitmq.destination.routing_key": due.pool,
                "messaging.batch.message_count": str(len(batch)),
                "rexec.task.id": due.id,
                "rexec.attempt": str(due.attempt),
            }
        )
        span = tracer.start_span(
            f"send {names.pool_queue(due.pool)}",
            context=tracing.context_from_traceparent(due.trace_parent),
            kind=SpanKind.PRODUCER,
            attributes=attributes,
        )
        spans.append(span)
        headers: dict[str, str] = {}
        tracing.inject(headers, context=trace.set_span_in_context(span))
        traceparents.append(headers.get("traceparent", ""))
    try:
        yield traceparents
    finally:
        for span in spans:
            span.end()
