"""Parks a task message the agent cannot use in ``rexec.dead.<pool>``, with the reason.

The reason travels in a header so an operator sees in the dashboard why the message was
refused, and which agent refused it. The message is acked only once the broker confirmed the
dead-letter copy, so a bad message is never silently lost.
"""

from __future__ import annotations

import logging

import aio_pika
import anyio
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from rexec.schemas import names

log = logging.getLogger("rexec.agent.deadletter")

AGENT_HEADER = names.DEAD_LETTER_AGENT_HEADER


async def dead_letter(
    exchange: AbstractExchange,
    message: AbstractIncomingMessage,
    *,
    reason: str,
    pool: str,
    agent_id: str,
    user_id: str | None = None,
) -> bool:
    """Publish the copy and wait for the confirm (retrying). False if it is unroutable."""
    headers = dict(message.headers or {})
    headers[names.REASON_HEADER] = reason
    headers[AGENT_HEADER] = agent_id
    copy = aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        type=message.type,
        message_id=message.message_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        user_id=user_id,
    )
    delay = 0.05
    while True:
        try:
            await exchange.publish(copy, routing_key=pool, timeout=30)
            return True
        except aio_pika.exceptions.PublishError as exc:
            log.error(
                "cannot dead-letter: no queue is bound for the pool in rexec.dead",
                extra={"agent_id": agent_id, "pool": pool, "error": repr(exc)},
            )
            return False
        except Exception as exc:
            log.warning(
                "dead-letter not confirmed, retrying",
                extra={"agent_id": agent_id, "error": repr(exc), "retry_in": delay},
            )
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)
