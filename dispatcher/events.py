"""The events consumer: applies agents' events to the database through the state machine.

Deliveries are taken in batches: one transaction and one (multiple) ack per batch. An event
is acked only after its effect is committed, so a crash replays it; replays are harmless
because the state machine rejects duplicates and events of other attempts.

No message can stop the consumer. One that cannot be decoded, or that reports for another
agent, is dead-lettered with the reason. One whose handling raises (a bug, or a value the
database refuses) fails its batch; the batch is then applied message by message, and the one
that raises again is dead-lettered with the error (``rexec_event_failures``), logged once, and
acked: a restarted dispatcher does not meet it again. A broker or database outage is not the
message's fault: it ends the consumer's channel as before, every message is redelivered, and
the consumer backs off until the outage ends (``outages.LoopHealth``).
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
from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from rexec.schemas import messages, names, tracing
from rexec.schemas.amqp import connection_up
from rexec.schemas.api import MAX_NESTING, TaskState

from . import credentials, statemachine, transitions
from .db.models import Agent
from .nesting import nested_deeper_than
from .outages import LoopHealth, database_outage
from .runtime import BROKER_ERRORS, Runtime

log = logging.getLogger("rexec.events")

PREFETCH = 2000
MAX_BATCH = 1000

REASON_LIMIT = 1000
"""Characters of an error kept in a dead-lettered message's reason header."""

_json = msgspec.json.Encoder()


async def run_events(rt: Runtime) -> None:
    """Consume ``rexec.events`` forever, reopening the channel after an error: a broker or
    database outage (the unacked events come back), or a bug, backed off and logged."""
    health = LoopHealth("events consumer", log)
    while True:
        try:
            await _consume(rt, health)
        except Exception as exc:
            log.info("events consumer lost its channel, reopening", extra={"error": str(exc)})
            await health.wait(exc)


async def _consume(rt: Runtime, health: LoopHealth | None = None) -> None:
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
            if health is not None:
                health.ok()  # a batch committed: an outage is over
    finally:
        await discard_channel(channel)


async def discard_channel(channel: AbstractChannel) -> None:
    """Close the channel for good, even one the broker already closed (or that never opened).

    A robust channel that was not closed by us is restored when the connection comes back,
    with its consumer: that zombie would take events into a stream nobody reads any more and
    hold them unacked (up to the prefetch) for as long as the dispatcher lives.
    """
    with anyio.move_on_after(5, shield=True):
        try:
            await channel.close()
        except Exception as exc:
            log.debug("closing a consumer's channel failed", extra={"error": repr(exc)})


async def handle_batch(
    rt: Runtime, channel: AbstractChannel, deliveries: Sequence[AbstractIncomingMessage]
) -> None:
    """Apply the deliveries' events; none of them can make this raise, only an outage can.

    Malformed and misattributed messages are dead-lettered with the reason. When applying
    the rest raises, they are applied one by one, and each that raises alone is dead-lettered
    with its error (``settled`` keeps a message from being dead-lettered twice)."""
    decoded: list[tuple[AbstractIncomingMessage, messages.EventBatch]] = []
    for delivery in deliveries:
        try:
            decoded.append((delivery, messages.decode_events(delivery.body)))
        except messages.MessageError as exc:
            await dead_letter(rt, channel, delivery, str(exc))
    settled: set[int] = set()
    try:
        await _apply_deliveries(rt, channel, decoded, settled)
    except Exception as exc:
        if outage(rt, channel, exc):
            raise
        if len(decoded) == 1:
            await _poisoned(rt, channel, decoded[0][0], exc)
            return
        log.debug("an events batch failed: applying its messages one by one", exc_info=exc)
        for one in decoded:
            if id(one[0]) in settled:
                continue
            try:
                await _apply_deliveries(rt, channel, [one], settled)
            except Exception as alone:
                if outage(rt, channel, alone):
                    raise
                await _poisoned(rt, channel, one[0], alone)


async def _apply_deliveries(
    rt: Runtime,
    channel: AbstractChannel,
    decoded: Sequence[tuple[AbstractIncomingMessage, messages.EventBatch]],
    settled: set[int],
) -> None:
    users = await _broker_users(rt, {e.agent_id for _, b in decoded for e in b.events})
    events: list[messages.Event] = []
    for delivery, batch in decoded:
        if id(delivery) in settled:
            continue
        forged = misattributed(delivery.user_id, batch.events, users)
        if forged is not None:
            rt.metrics.stale_events.labels("forged").inc(len(batch.events))
            await dead_letter(rt, channel, delivery, forged)
            settled.add(id(delivery))
            continue
        events.extend(batch.events)
    if events:
        await apply_events(rt, events)


def outage(rt: Runtime, channel: AbstractChannel, exc: Exception) -> bool:
    """Whether ``exc`` says the broker or the database is away (every message would fail
    alike, and succeed later), rather than that the message at hand cannot be handled."""
    if database_outage(exc):
        return True
    if isinstance(exc, RecursionError):
        return False
    if isinstance(exc, RuntimeError):  # aiormq's "... closed", or a bug: ask the broker
        return channel.is_closed or not connection_up(rt.connection)
    return isinstance(exc, BROKER_ERRORS)


async def _poisoned(
    rt: Runtime, channel: AbstractChannel, delivery: AbstractIncomingMessage, exc: Exception
) -> None:
    """Dead-letter a message whose handling raised, with the error, and count it."""
    error = type(exc).__name__
    rt.metrics.event_failures.labels(error).inc()
    reason = f"handling the events failed: {error}: {exc}"
    await dead_letter(rt, channel, delivery, reason[:REASON_LIMIT], exc)


async def _broker_users(rt: Runtime, agent_ids: set[str]) -> dict[str, str | None]:
    """The broker user issued to each agent (None: shared credentials, or not registered).

    Issued once at registration and never changed, so what was read once stays true."""
    cache = rt.broker_users
    unknown = [a for a in agent_ids if a not in cache]
    if unknown:
        async with rt.sessions() as session:
            rows = await session.execute(
                select(Agent.id, Agent.broker_user).where(Agent.id.in_(unknown))
            )
            found = {agent_id: user for agent_id, user in rows}
        for agent_id in unknown:
            if agent_id in found:  # an agent not registered yet may be soon: ask again then
                cache[agent_id] = found[agent_id]
    return {a: cache.get(a) for a in agent_ids}


def misattributed(
    publisher: str | None, events: Sequence[messages.Event], users: dict[str, str | None]
) -> str | None:
    """Why the batch must not be believed, or None: an agent reports only for itself.

    RabbitMQ checks the ``user_id`` property against the publisher's login, so it names the
    broker user that really published. Events of an agent that has a user of its own must
    come from that user; an agent's user may publish only its own agent's events."""
    publishing_agent = names.agent_of_broker_user(publisher) if publisher else None
    for event in events:
        expected = users.get(event.agent_id)
        if expected is not None and publisher != expected:
            return (
                f"events of agent {event.agent_id} published by "
                f"{'an unnamed user' if publisher is None else repr(publisher)}, not by its "
                f"own broker user {expected!r}: one agent cannot report for another"
            )
        if publishing_agent is not None and publishing_agent != event.agent_id:
            return (
                f"broker user {publisher!r} of agent {publishing_agent} published events of "
                f"agent {event.agent_id}: one agent cannot report for another"
            )
    return None


async def dead_letter(
    rt: Runtime,
    channel: AbstractChannel,
    delivery: AbstractIncomingMessage,
    reason: str,
    exc: BaseException | None = None,
) -> None:
    """Publish the message to ``rexec.dead.events`` with the reason in a header (an
    operator can read it there, and send it back to ``rexec.events`` once it can apply)."""
    log.error("dead-lettering a bad event message", exc_info=exc, extra={"reason": reason})
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

    The tasks are read as plain rows and written back in a few executemany statements: no
    ORM objects, whose unit of work cost more CPU than the SQL on this path."""
    now = time.time()
    stop: list[tuple[str, messages.Control]] = []
    offline: list[str] = []
    retried = False
    task_ids = {e.task_id for e in events if isinstance(e, messages.TaskEvent)}
    async with rt.sessions.begin() as session:
        rows = await transitions.lock_rows(session, task_ids) if task_ids else {}
        writer = transitions.BatchWriter()
        for event in events:
            if isinstance(event, messages.AgentOnline | messages.AgentOffline):
                if isinstance(event, messages.AgentOffline):
                    offline.append(event.agent_id)
                await _agent_seen(session, event)
                continue
            event = admissible(event)
            decision = _decide(rt, rows.get(event.task_id), event, stop)
            if decision is None:
                continue
            row = rows[event.task_id]
            result_json, error_json = _outcome_json(event)
            writes = transitions.plan(
                row, decision, now, result_json=result_json, error_json=error_json, event=event
            )
            writer.add(row, writes)
            _observe(rt, row, decision, event.at)
            if isinstance(event, messages.Returned):
                rt.metrics.requeues.labels("returned").inc()
            if tracing.active():
                _record_span(row, event, decision)
            retried = retried or decision.retry_in is not None
        await writer.flush(session)
    rt.notify_applied()
    if retried:
        rt.wake_relay()
    for agent_id, control in stop:
        await rt.publish_control(agent_id, control)
    if offline:
        await _forget_heartbeats(rt, offline)
        await credentials.withdraw(rt, offline, "the agent went offline")


async def _forget_heartbeats(rt: Runtime, agent_ids: list[str]) -> None:
    """Delete the heartbeat keys of agents that went offline. A stopping agent leaves its key
    (marked stopped) for the dispatcher to delete once its ``offline``, which it sends after
    all its other events, was applied: until then the watchdog takes the agent for alive, and
    does not hand a task whose success is still on the way to another agent."""
    try:
        await rt.redis.delete(*(rt.keys.agent(agent_id) for agent_id in agent_ids))
    except (RedisError, OSError) as exc:  # the key expires by itself
        log.warning("could not delete stopped agents' heartbeat keys", extra={"error": str(exc)})


def admissible(event: messages.TaskEvent) -> messages.TaskEvent:
    """The event as the metadata database can keep it and the API can show it again.

    A result nested deeper than ``MAX_NESTING`` fails the attempt as ``ResultTooDeep`` (not
    retried, like the agent's ``ResultTooLarge``): stored, it would break every read of the
    task. A NUL in the log tail (a command's binary output) or a reason, which PostgreSQL
    cannot store in text, is shown as U+FFFD."""
    if isinstance(event, messages.Succeeded) and nested_deeper_than(event.result, MAX_NESTING):
        event = messages.Failed(
            task_id=event.task_id,
            attempt=event.attempt,
            agent_id=event.agent_id,
            at=event.at,
            log_tail=event.log_tail,
            log_ref=event.log_ref,
            error_type="ResultTooDeep",
            message=f"the result nests more than {MAX_NESTING} levels of arrays and objects: "
            "return a flatter value, or store the result elsewhere and return a reference",
            retryable=False,
        )
    if isinstance(event, messages.LOGGED_EVENTS) and (
        "\x00" in event.log_tail or "\x00" in event.log_ref
    ):
        event = msgspec.structs.replace(
            event, log_tail=_no_nul(event.log_tail), log_ref=_no_nul(event.log_ref)
        )
    if isinstance(event, messages.Returned) and "\x00" in event.reason:
        event = msgspec.structs.replace(event, reason=_no_nul(event.reason))
    return event


def _no_nul(text: str) -> str:
    return text.replace("\x00", "\ufffd")


async def _agent_seen(
    session: AsyncSession, event: messages.AgentOnline | messages.AgentOffline
) -> None:
    state = "online" if isinstance(event, messages.AgentOnline) else "offline"
    await session.execute(
        update(Agent).where(Agent.id == event.agent_id).values(state=state, last_seen_at=event.at)
    )


def _decide(
    rt: Runtime,
    row: transitions.TaskRow | None,
    event: messages.TaskEvent,
    stop: list[tuple[str, messages.Control]],
) -> statemachine.Transition | None:
    """The transition the event makes, or None when fencing rejects it (counted, logged, and
    the attempt told to stop when it must not run on)."""
    if row is None:
        _reject(rt, event, "unknown_task")
        return None
    decision = statemachine.on_event(transitions.snapshot(row), event)
    if isinstance(decision, statemachine.Transition):
        return decision
    _reject(rt, event, decision.reason)
    if decision.stop_attempt:
        action: Literal["cancel", "lease_lost"] = (
            "cancel" if row.cancel_requested or row.state == "cancelled" else "lease_lost"
        )
        stop.append(
            (event.agent_id, messages.Control(action=action, task_id=row.id, attempt=event.attempt))
        )
    return None


def _outcome_json(event: messages.TaskEvent) -> tuple[str | None, str | None]:
    """The result and error JSON an event leaves on its task."""
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
