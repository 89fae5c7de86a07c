"""The events consumer: applies agents' events to the database through the state machine.

Deliveries are taken in batches: one transaction and one (multiple) ack per batch. An event
is acked only after its effect is committed, so a crash replays it; replays are harmless
because the state machine rejects duplicates and events of other attempts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Literal

import aio_pika
import anyio
import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from opentelemetry.trace import SpanKind
from sqlalchemy import select, update

from schemas import messages, names, tracing
from schemas.api import TaskState

from . import statemachine, transitions
from .db.models import Agent, Task
from .runtime import BROKER_ERRORS, Runtime

log = logging.getLogger("rexec.events")

PREFETCH = 2000
MAX_BATCH = 1000

_json = msgspec.json.Encoder()


async def run_events(rt: Runtime) -> None:
    """Consume ``rexec.events`` forever, reopening the channel after an error."""
    while True:
        try:
            await _consume(rt)
        except BROKER_ERRORS as exc:
            log.warning("events consumer lost its channel, reopening", extra={"error": str(exc)})
            await anyio.sleep(0.5)


async def _consume(rt: Runtime) -> None:
    channel = rt.connection.channel(publisher_confirms=True)
    try:
        await channel.initialize()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(names.EVENTS_QUEUE)
        send, receive = anyio.create_memory_object_stream[AbstractIncomingMessage](math.inf)

        async def on_message(message: AbstractIncomingMessage) -> None:
            send.send_nowait(message)

        await queue.consume(on_message)
        while True:
            batch = [await receive.receive()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(receive.receive_nowait())
                except anyio.WouldBlock:
                    break
            await handle_batch(rt, channel, batch)
            await batch[-1].ack(multiple=True)
    finally:
        await _discard(channel)


async def _discard(channel: AbstractChannel) -> None:
    """Close the channel for good, even one the broker already closed (or that never opened).

    A robust channel that was not closed by us is restored when the connection comes back,
    with its consumer: that zombie would take events into a stream nobody reads any more and
    hold them unacked (up to the prefetch) for as long as the dispatcher lives.
    """
    with anyio.move_on_after(5, shield=True):
        try:
            await channel.close()
        except Exception as exc:
            log.debug("closing the events channel failed", extra={"error": repr(exc)})


async def handle_batch(
    rt: Runtime, channel: AbstractChannel, deliveries: Sequence[AbstractIncomingMessage]
) -> None:
    events: list[messages.Event] = []
    for delivery in deliveries:
        try:
            events.extend(messages.decode_events(delivery.body).events)
        except messages.MessageError as exc:
            await dead_letter(rt, channel, delivery, str(exc))
    if events:
        await apply_events(rt, events)


async def dead_letter(
    rt: Runtime, channel: AbstractChannel, delivery: AbstractIncomingMessage, reason: str
) -> None:
    log.error("dead-lettering a bad event message", extra={"reason": reason})
    dead = await channel.get_exchange(names.DEAD_EXCHANGE)
    headers = dict(delivery.headers or {})
    headers[names.REASON_HEADER] = reason
    await dead.publish(
        aio_pika.Message(
            delivery.body,
            headers=headers,
            content_type=delivery.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=names.DEAD_EVENTS_ROUTING_KEY,
    )
    rt.metrics.dead_lettered.labels("events").inc()


async def apply_events(rt: Runtime, events: Sequence[messages.Event]) -> None:
    """Apply a batch of events in one transaction; then stop attempts that must not run.

    Tasks are read as plain rows (locked where the database can) and the transitions written
    in bulk (``transitions.Changes``), each update fenced by the attempt that was read.
    """
    now = time.time()
    stop: list[tuple[str, messages.Control]] = []
    retried = False
    task_ids = {e.task_id for e in events if isinstance(e, messages.TaskEvent)}
    async with rt.sessions.begin() as session:
        tasks: dict[str, transitions.TaskRow] = {}
        if task_ids:
            result = await session.execute(
                select(*transitions.ROW_COLUMNS).where(Task.id.in_(task_ids)).with_for_update()
            )
            tasks = {row.id: transitions.TaskRow.from_row(row) for row in result}
        changes = transitions.Changes()
        for event in events:
            if isinstance(event, messages.AgentOnline | messages.AgentOffline):
                state = "online" if isinstance(event, messages.AgentOnline) else "offline"
                await session.execute(
                    update(Agent)
                    .where(Agent.id == event.agent_id)
                    .values(state=state, last_seen_at=event.at)
                )
                continue
            task = tasks.get(event.task_id)
            if task is None:
                _reject(rt, event, "unknown_task")
                continue
            decision = statemachine.on_event(transitions.snapshot(task), event)
            if isinstance(decision, statemachine.Reject):
                _reject(rt, event, decision.reason)
                if decision.stop_attempt:
                    action: Literal["cancel", "lease_lost"] = (
                        "cancel"
                        if task.cancel_requested or task.state == "cancelled"
                        else "lease_lost"
                    )
                    stop.append(
                        (
                            event.agent_id,
                            messages.Control(action=action, task_id=task.id, attempt=event.attempt),
                        )
                    )
                continue
            result_json, error_json = _outcome_json(event)
            changes.apply(task, decision, now, result_json=result_json, error_json=error_json)
            _observe(rt, task, decision, event.at)
            if tracing.active():
                _record_span(task, event, decision)
            retried = retried or decision.retry_in is not None
        await changes.flush(session)
    rt.notify_applied()
    if retried:
        rt.wake_relay()
    for agent_id, control in stop:
        await rt.publish_control(agent_id, control)


def _outcome_json(event: messages.TaskEvent) -> tuple[str | None, str | None]:
    """The result and error columns an event writes (JSON text, passed through as is)."""
    if isinstance(event, messages.Succeeded):
        return _json.encode(event.result).decode(), None
    if isinstance(event, messages.Failed):
        error = {"type": event.error_type, "message": event.message, "traceback": event.traceback}
        return None, _json.encode(error).decode()
    if isinstance(event, messages.TimedOut):
        error = {
            "type": "TimedOut",
            "message": f"attempt ran longer than its {event.timeout:g}s timeout",
        }
        return None, _json.encode(error).decode()
    return None, None


def _observe(
    rt: Runtime, task: transitions.TaskRow, decision: statemachine.Transition, at: float
) -> None:
    if decision.to is TaskState.RUNNING:
        rt.metrics.submit_to_start.labels(task.pool).observe(max(0.0, at - task.created_at))
    elif decision.to.terminal and task.started_at is not None:
        rt.metrics.run_time.labels(task.pool, decision.to.value).observe(
            max(0.0, at - task.started_at)
        )


def _record_span(
    task: transitions.TaskRow, event: messages.TaskEvent, decision: statemachine.Transition
) -> None:
    """A span in the task's trace for each recorded event (retries and takeovers included)."""
    kind = type(event).__name__.lower()
    attributes = tracing.messaging_attributes(
        names.EVENTS_QUEUE, "process", f"{event.task_id}:{event.attempt}"
    )
    attributes.update(
        {
            "rexec.task.id": event.task_id,
            "rexec.attempt": str(event.attempt),
            "rexec.agent.id": event.agent_id,
            "rexec.event": kind,
            "rexec.state": decision.to.value,
        }
    )
    span = tracing.tracer("rexec.dispatcher").start_span(
        f"record {kind}",
        context=tracing.context_from_traceparent(task.trace_parent),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    )
    span.end()


def _reject(rt: Runtime, event: messages.TaskEvent, reason: str) -> None:
    rt.metrics.stale_events.labels(reason).inc()
    log.info(
        "rejected event",
        extra={
            "reason": reason,
            "type": type(event).__name__.lower(),
            "task_id": event.task_id,
            "attempt": event.attempt,
            "agent_id": event.agent_id,
        },
    )
