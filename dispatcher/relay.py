"""The outbox relay: publishes committed attempts to their pool's queue, then forgets them.

The API commits a task and its outbox row together; the relay publishes persistent messages
with publisher confirms and ``mandatory`` (an unroutable pool is an error, not a silent drop),
and deletes the outbox rows only after the broker confirmed. A crash in between publishes the
same attempt again; agents recognise the duplicate by its lease.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import aio_pika
import anyio
import msgspec
from aio_pika.abc import AbstractExchange
from aio_pika.exceptions import DeliveryError
from opentelemetry.trace import SpanKind
from pamqp.commands import Basic
from sqlalchemy import delete, func, select

from schemas import messages, names, signing, tracing
from schemas.api import TaskState

from . import limits
from .db.models import Outbox, Pool, Task
from .runtime import BROKER_ERRORS, Runtime

log = logging.getLogger("rexec.relay")

BATCH_SIZE = 500
IDLE_POLL = 1.0
"""Seconds between looks at the outbox when nothing woke the relay (other replicas, retries)."""

_json = msgspec.json.Decoder()


def task_message(task: Task, attempt: int) -> messages.TaskMessage:
    return messages.TaskMessage(
        task_id=task.id,
        attempt=attempt,
        pool=task.pool,
        kind="command" if task.kind == "command" else "function",
        target=task.target,
        argv=_json.decode(task.argv_json),
        args=_json.decode(task.args_json),
        kwargs=_json.decode(task.kwargs_json),
        timeout=task.timeout,
        expires_at=task.expires_at,
        submitted_at=task.created_at,
        secrets=_json.decode(task.secrets_json or "[]"),
    )


async def run_relay(rt: Runtime) -> None:
    channel, exchange = rt.channel, await rt.exchange(names.TASKS_EXCHANGE)
    while True:
        rt.relay_wakeup = anyio.Event()
        try:
            if rt.channel is not channel:  # renewed after a nack
                channel, exchange = rt.channel, await rt.exchange(names.TASKS_EXCHANGE)
            published, next_due = await relay_once(rt, exchange)
        except BROKER_ERRORS as exc:
            log.warning("relay could not publish, will retry", extra={"error": str(exc)})
            await anyio.sleep(0.5)
            continue
        if published >= BATCH_SIZE:
            continue
        wait = IDLE_POLL if next_due is None else max(0.0, min(IDLE_POLL, next_due - time.time()))
        with anyio.move_on_after(wait):
            await rt.relay_wakeup.wait()


async def relay_once(rt: Runtime, exchange: AbstractExchange) -> tuple[int, float | None]:
    """Publish one batch of due outbox rows; return how many, and when the next one is due."""
    now = time.time()
    async with rt.sessions() as session:
        # Pools at their max_running are left out; the others get at most their free slots.
        slots = await limits.free_slots(session)
        full = [pool for pool, free in slots.items() if free <= 0]
        rows = (
            await session.execute(
                select(Outbox, Task)
                .join(Task, Task.id == Outbox.task_id)
                .join(Pool, Pool.name == Task.pool)
                .where(Outbox.available_at <= now, Pool.draining.is_(False), Pool.name.not_in(full))
                .order_by(Outbox.id)
                .limit(BATCH_SIZE)
            )
        ).all()
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
    live = [(o, t) for o, t in rows if t.state == TaskState.QUEUED and t.attempt == o.attempt]
    done, failure = await _publish(rt, exchange, live)
    live_ids = {o.id for o, _ in live}
    done.extend(o.id for o, _ in rows if o.id not in live_ids)
    if done:
        async with rt.sessions.begin() as session:
            await session.execute(delete(Outbox).where(Outbox.id.in_(done)))
    if failure is not None:
        raise failure  # after forgetting what was confirmed: the caller backs off and retries
    return fetched, next_due


async def _publish(
    rt: Runtime, exchange: AbstractExchange, rows: Sequence[tuple[Outbox, Task]]
) -> tuple[list[int], Exception | None]:
    """Publish concurrently (confirms pipeline); return the outbox ids the broker confirmed,
    and the first broker error if some publishes failed (they stay in the outbox).

    Each publish catches its own broker error: raised inside the task group, it would come out
    as an ``ExceptionGroup`` that no ``except`` of the caller matches, and end the dispatcher.
    """
    confirmed: list[int] = []
    unroutable: set[str] = set()
    failures: list[Exception] = []
    nacked: list[Exception] = []

    async def one(outbox: Outbox, task: Task) -> None:
        body = messages.encode(task_message(task, outbox.attempt))
        message_id = f"{task.id}:{outbox.attempt}"
        message = aio_pika.Message(
            body,
            headers={signing.SIGNATURE_HEADER: rt.signer.sign(body)},
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            type="rexec.task",
            timestamp=time.time(),
        )
        try:
            with _send_span(task, outbox.attempt, message):
                await exchange.publish(message, routing_key=task.pool, mandatory=True)
        except DeliveryError as exc:
            if isinstance(exc.frame, Basic.Nack):  # refused, not returned: retry elsewhere
                failures.append(exc)
                nacked.append(exc)
            else:
                unroutable.add(task.pool)
            return
        except BROKER_ERRORS as exc:  # broker gone or channel being restored
            failures.append(exc)
            return
        confirmed.append(outbox.id)

    async with anyio.create_task_group() as tg:
        for outbox, task in rows:
            tg.start_soon(one, outbox, task)
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


@contextmanager
def _send_span(task: Task, attempt: int, message: aio_pika.Message) -> Iterator[None]:
    """The attempt's ``send`` span, child of the task's ``create`` span; its context travels
    in the message's headers to the agent. Nothing at all when tracing is off."""
    if not tracing.active():
        yield
        return
    attributes = tracing.messaging_attributes(
        names.TASKS_EXCHANGE, "send", message.message_id or ""
    )
    attributes.update(
        {
            "messaging.rabbitmq.destination.routing_key": task.pool,
            "rexec.task.id": task.id,
            "rexec.attempt": str(attempt),
        }
    )
    with tracing.tracer("rexec.dispatcher").start_as_current_span(
        f"send {names.pool_queue(task.pool)}",
        context=tracing.context_from_traceparent(task.trace_parent),
        kind=SpanKind.PRODUCER,
        attributes=attributes,
    ):
        headers: dict[str, str] = {}
        tracing.inject(headers)
        message.headers = {**(message.headers or {}), **headers}
        yield
