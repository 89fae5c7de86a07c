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
from typing import Any, Protocol

import aio_pika
import anyio
import msgspec
from aio_pika.abc import AbstractExchange
from aio_pika.exceptions import DeliveryError
from opentelemetry.trace import SpanKind
from sqlalchemy import delete, func, select

from schemas import messages, names, tracing
from schemas.api import TaskState

from .db.models import Outbox, Pool, Task
from .runtime import BROKER_ERRORS, Runtime

log = logging.getLogger("rexec.relay")

BATCH_SIZE = 500
IDLE_POLL = 1.0
"""Seconds between looks at the outbox when nothing woke the relay (other replicas, retries)."""

_json = msgspec.json.Decoder()


class _TaskFields(Protocol):
    """What a task message is built from: an ORM ``Task`` or a row of ``RELAY_COLUMNS``."""

    id: str
    pool: str
    kind: str
    target: str
    argv_json: str
    args_json: str
    kwargs_json: str
    timeout: float | None
    expires_at: float | None
    created_at: float
    trace_parent: str | None


RELAY_COLUMNS = (
    Outbox.id.label("outbox_id"),
    Outbox.attempt.label("outbox_attempt"),
    Task.id,
    Task.pool,
    Task.kind,
    Task.target,
    Task.argv_json,
    Task.args_json,
    Task.kwargs_json,
    Task.timeout,
    Task.expires_at,
    Task.created_at,
    Task.trace_parent,
    Task.state,
    Task.attempt,
)
"""Read as plain rows (no ORM objects): all a publish needs, and the fencing columns."""


def task_message(task: _TaskFields, attempt: int) -> messages.TaskMessage:
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
    )


async def run_relay(rt: Runtime) -> None:
    exchange = await rt.exchange(names.TASKS_EXCHANGE)
    while True:
        rt.relay_wakeup = anyio.Event()
        try:
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
        rows = (
            await session.execute(
                select(*RELAY_COLUMNS)
                .join(Task, Task.id == Outbox.task_id)
                .join(Pool, Pool.name == Task.pool)
                .where(Outbox.available_at <= now, Pool.draining.is_(False))
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
    if not rows:
        return 0, next_due
    live = [r for r in rows if r.state == TaskState.QUEUED and r.attempt == r.outbox_attempt]
    done, failure = await _publish(rt, exchange, live)
    live_ids = {r.outbox_id for r in live}
    done.extend(r.outbox_id for r in rows if r.outbox_id not in live_ids)
    if done:
        async with rt.sessions.begin() as session:
            await session.execute(delete(Outbox).where(Outbox.id.in_(done)))
    if failure is not None:
        raise failure  # after forgetting what was confirmed: the caller backs off and retries
    return len(rows), next_due


def build_message(task: _TaskFields, attempt: int) -> aio_pika.Message:
    """The AMQP message of one attempt: body and properties, built here and nowhere else."""
    return aio_pika.Message(
        messages.encode(task_message(task, attempt)),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=f"{task.id}:{attempt}",
        type="rexec.task",
        timestamp=time.time(),
    )


async def _publish(
    rt: Runtime, exchange: AbstractExchange, rows: Sequence[Any]
) -> tuple[list[int], Exception | None]:
    """Publish concurrently (confirms pipeline); return the outbox ids the broker confirmed,
    and the first broker error if some publishes failed (they stay in the outbox).

    Each publish catches its own broker error: raised inside the task group, it would come out
    as an ``ExceptionGroup`` that no ``except`` of the caller matches, and end the dispatcher.
    """
    confirmed: list[int] = []
    unroutable: set[str] = set()
    failures: list[Exception] = []

    async def one(task: Any) -> None:
        message = build_message(task, task.outbox_attempt)
        try:
            with _send_span(task, task.outbox_attempt, message):
                await exchange.publish(message, routing_key=task.pool, mandatory=True)
        except DeliveryError:
            unroutable.add(task.pool)
            return
        except BROKER_ERRORS as exc:  # broker gone or channel being restored
            failures.append(exc)
            return
        confirmed.append(task.outbox_id)

    async with anyio.create_task_group() as tg:
        for row in rows:
            tg.start_soon(one, row)
    if failures:
        return confirmed, failures[0]
    for pool in unroutable:
        # The pool's queue is gone (deleted by hand?): declare it again; the rows stay for the next round.
        log.error("pool queue missing, declaring it again", extra={"pool": pool})
        await rt.declare_pool(pool)
    return confirmed, None


@contextmanager
def _send_span(task: _TaskFields, attempt: int, message: aio_pika.Message) -> Iterator[None]:
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
