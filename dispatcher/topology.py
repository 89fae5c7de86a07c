"""Declares the RabbitMQ topology named in the guide; only the dispatcher configures the broker.

Agents never declare anything (their credentials cannot): they check their queues passively.
Every queue is a quorum queue: a classic durable queue lives on one node, and while that node
is down the queue cannot be declared or consumed, so a client's reconnect (which restores its
queues) would fail on every other node of the cluster too.
"""

from __future__ import annotations

import logging

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from aio_pika.exceptions import ChannelClosed
from pamqp.common import FieldTable

from rexec.schemas import names

log = logging.getLogger("rexec.topology")

AGENT_QUEUE_EXPIRES_MS = 3_600_000
"""An agent's control queue disappears an hour after its agent stopped consuming it."""
QUORUM: FieldTable = {"x-queue-type": "quorum"}


async def declare_core(channel: AbstractChannel) -> None:
    direct = aio_pika.ExchangeType.DIRECT
    await channel.declare_exchange(names.TASKS_EXCHANGE, direct, durable=True)
    await channel.declare_exchange(names.CONTROL_EXCHANGE, direct, durable=True)
    dead = await channel.declare_exchange(names.DEAD_EXCHANGE, direct, durable=True)
    events = await channel.declare_exchange(
        names.EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    queue = await channel.declare_queue(
        names.EVENTS_QUEUE,
        durable=True,
        arguments={
            **QUORUM,
            "x-dead-letter-exchange": names.DEAD_EXCHANGE,
            "x-dead-letter-routing-key": names.DEAD_EVENTS_ROUTING_KEY,
        },
    )
    await queue.bind(events, routing_key="")
    dead_events = await channel.declare_queue(
        names.dead_queue(names.DEAD_EVENTS_ROUTING_KEY), durable=True, arguments=QUORUM
    )
    await dead_events.bind(dead, routing_key=names.DEAD_EVENTS_ROUTING_KEY)


async def declare_pool(channel: AbstractChannel, pool: str, delivery_limit: int) -> None:
    """The pool's quorum queue; poison messages go to ``rexec.dead.<pool>`` after the limit."""
    tasks = await channel.get_exchange(names.TASKS_EXCHANGE)
    queue = await channel.declare_queue(
        names.pool_queue(pool),
        durable=True,
        arguments={
            **QUORUM,
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": names.DEAD_EXCHANGE,
            "x-dead-letter-routing-key": pool,
        },
    )
    await queue.bind(tasks, routing_key=pool)
    await declare_dead_queue(channel, pool)


async def declare_dead_queue(channel: AbstractChannel, pool: str) -> AbstractQueue:
    """``rexec.dead.<pool>``, bound to ``rexec.dead``: where the pool's unusable task messages
    go (the broker's at the delivery limit, an agent's with the reason)."""
    dead = await channel.get_exchange(names.DEAD_EXCHANGE)
    queue = await channel.declare_queue(names.dead_queue(pool), durable=True, arguments=QUORUM)
    await queue.bind(dead, routing_key=pool)
    return queue


def _pool_queues(pool: str) -> tuple[str, str]:
    return names.pool_queue(pool), names.dead_queue(pool)


async def pool_declared(connection: AbstractConnection, pool: str) -> bool:
    """Whether the pool's queue exists already (a passive declare, on a channel of its own:
    the broker closes the channel that asks for a missing queue)."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(names.pool_queue(pool), passive=True)
        return True
    except ChannelClosed:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()


async def undeclare_pool(connection: AbstractConnection, pool: str) -> None:
    """Delete what ``declare_pool`` made, for a pool whose creation failed after it: its
    queues (with their bindings), each only if empty, so no message is ever lost.

    Quorum queues refuse ``if-empty`` deletes (by closing the connection), so each queue is
    counted first; nothing publishes to a pool that has no row meanwhile."""
    for queue in _pool_queues(pool):
        channel = await connection.channel()  # a missing queue closes its channel
        try:
            declared = await channel.declare_queue(queue, passive=True)
            count = declared.declaration_result.message_count
            if count:
                log.warning(
                    "kept a queue of a pool whose creation failed: it holds messages",
                    extra={"pool": pool, "queue": queue, "messages": count},
                )
                continue
            await channel.queue_delete(queue)
        except ChannelClosed:
            pass  # not there: nothing to undo
        finally:
            if not channel.is_closed:
                await channel.close()


async def declare_agent_queue(channel: AbstractChannel, agent_id: str) -> None:
    control = await channel.get_exchange(names.CONTROL_EXCHANGE)
    queue = await channel.declare_queue(
        names.agent_queue(agent_id),
        durable=True,
        arguments={**QUORUM, "x-expires": AGENT_QUEUE_EXPIRES_MS},
    )
    await queue.bind(control, routing_key=agent_id)
