"""One delivery from the pool queue: a single task, or a batch of them (protocol 1.2).

The delivery is acked once every task it carries is settled: started (its ``started`` event
confirmed), finished without starting (expired, refused, duplicate, cancelled) or handed
back. Until then the broker keeps it, so an agent that dies with a batch half started has it
redelivered: the tasks that had started are duplicates for their lease (or ended by the
watchdog, which tombstones their lease), the others start elsewhere.

A task the agent hands back on purpose (it drains, or waited too long for a slot) is reported
``returned`` and settled: the dispatcher publishes that attempt again, in a new message. A
requeue would spend the quorum queue's delivery limit: RabbitMQ up to 4.2 counts every return
(a nack or reject with requeue, as well as the deliveries of a closed channel) and dead-letters
the message past ``x-delivery-limit``, so a task handed back by a few drains and restarts was
dead-lettered for nothing (4.3 stops counting ``basic.nack``, not ``basic.reject``). A task of
a batch could not be requeued alone anyway. Only a delivery whose handling failed is requeued,
by ``basic.reject``: that counts in every version, so a message that breaks agents ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from rexec.schemas import messages

log = logging.getLogger("rexec.agent.delivery")

Emit = Callable[[messages.Event], Awaitable[None]]


class Delivery:
    """The message and how many of its tasks are not settled yet."""

    def __init__(
        self, message: AbstractIncomingMessage, *, batched: bool, emit: Emit, agent_id: str
    ) -> None:
        self.message = message
        self.batched = batched
        self.unsettled = 0
        self._emit = emit
        self.agent_id = agent_id

    def task(self, task: messages.TaskMessage, headers: Mapping[str, Any] | None) -> DeliveredTask:
        self.unsettled += 1
        return DeliveredTask(self, task, headers)

    async def _settled(self) -> None:
        self.unsettled -= 1
        if self.unsettled == 0:
            await ack(self.message, self.agent_id)


class DeliveredTask:
    """One task of a delivery; settled once (later calls do nothing)."""

    def __init__(
        self, delivery: Delivery, task: messages.TaskMessage, headers: Mapping[str, Any] | None
    ) -> None:
        self.delivery = delivery
        self.task = task
        self.headers = headers
        """Where the task's W3C trace context is (the message's, or its own in a batch)."""
        self.settled = False

    async def settle(self) -> None:
        """The task started or finished without starting; the delivery's last one acks it."""
        if not self.settled:
            self.settled = True
            await self.delivery._settled()

    async def hand_back(self, reason: str) -> None:
        """Give the unstarted task back so another agent runs it (its lease is not held),
        without spending the delivery limit (see the module's docstring)."""
        await self.report_returned(reason)

    async def report_returned(self, reason: str) -> None:
        """Report the unstarted task ``returned`` (the dispatcher publishes it again, or
        ignores it if it has moved on) and settle it."""
        if self.settled:
            return
        delivery = self.delivery
        await delivery._emit(
            messages.Returned(
                task_id=self.task.task_id,
                attempt=self.task.attempt,
                agent_id=delivery.agent_id,
                at=time.time(),
                reason=reason,
            )
        )
        await self.settle()


async def ack(message: AbstractIncomingMessage, agent_id: str) -> None:
    try:
        await message.ack()
    except Exception as exc:
        # The channel was lost: the broker redelivers, and the lease marks it a duplicate.
        log.warning(
            "ack failed; the broker will redeliver and the lease will mark it a duplicate",
            extra={"agent_id": agent_id, "error": repr(exc)},
        )


async def requeue(message: AbstractIncomingMessage) -> None:
    """Return a delivery whose handling failed, counted toward the delivery limit."""
    try:
        await message.reject(requeue=True)
    except Exception as exc:  # channel lost: the broker requeues it by itself
        log.debug("reject failed", extra={"error": repr(exc)})
