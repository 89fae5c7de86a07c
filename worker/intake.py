"""Intake from the pool queue: deliveries in, their tasks gated by free slots, paused when
saturated.

A delivery is acked once its tasks have started, so the broker's prefetch limits deliveries
waiting for a slot, not tasks running. When every slot holds a long task, a waiting delivery
could sit unacked for hours and trip RabbitMQ's consumer_timeout, and it would be hoarded
from idle agents. So when a task has waited ``pause_after`` seconds, intake pauses (the
consumer is cancelled) and a task that has waited ``return_after`` seconds is handed back
(``delivery.py``); intake resumes once a slot is free and nobody waits.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import anyio
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, ConsumerTag
from anyio.abc import ObjectReceiveStream

log = logging.getLogger("rexec.agent.intake")


@dataclass(eq=False)
class _Waiting:
    since: float
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class Slot:
    """One running place; released once, as soon as the task's process is done."""

    def __init__(self, slots: anyio.Semaphore) -> None:
        self._slots: anyio.Semaphore | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


class Intake:
    def __init__(
        self,
        queue: AbstractQueue,
        concurrency: int,
        *,
        pause_after: float,
        return_after: float,
        agent_id: str = "",
    ) -> None:
        self.queue = queue
        self.concurrency = concurrency
        self.pause_after = pause_after
        self.return_after = return_after
        self.agent_id = agent_id
        self.slots = anyio.Semaphore(concurrency)
        send, receive = anyio.create_memory_object_stream[AbstractIncomingMessage](math.inf)
        self._send = send
        self.deliveries: ObjectReceiveStream[AbstractIncomingMessage] = receive
        self._tag: ConsumerTag | None = None
        self._waiting: set[_Waiting] = set()
        self.stopped = False
        self.pauses = 0
        self.returned = 0

    @property
    def waiting(self) -> int:
        """Deliveries waiting for a slot."""
        return len(self._waiting)

    @property
    def consuming(self) -> bool:
        return self._tag is not None

    async def start(self) -> None:
        self._tag = await self.queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._send.send_nowait(message)

    async def acquire(self) -> Slot | None:
        """Wait for a slot. None: hand the task back (the agent drains, or it waited
        ``return_after`` seconds)."""
        if not self.stopped:
            try:
                self.slots.acquire_nowait()
                return Slot(self.slots)
            except anyio.WouldBlock:
                pass
        acquired = False
        if not self.stopped:
            waiting = _Waiting(anyio.current_time())
            self._waiting.add(waiting)
            try:
                with waiting.scope:
                    await self.slots.acquire()
                    acquired = True
            finally:
                self._waiting.discard(waiting)
        if acquired and self.stopped:
            self.slots.release()
            acquired = False
        if not acquired:
            self.returned += 1
            return None
        return Slot(self.slots)

    async def run(self) -> None:
        """Pause, hand back and resume as described above; the caller cancels it."""
        tick = max(0.02, min(self.pause_after / 2, 0.25))
        while not self.stopped:
            await anyio.sleep(tick)
            now = anyio.current_time()
            oldest = min((w.since for w in self._waiting), default=now)
            if self.consuming and now - oldest >= self.pause_after:
                await self._pause("intake paused: every slot is busy with long tasks")
            for waiting in list(self._waiting):
                if now - waiting.since >= self.return_after:
                    waiting.scope.cancel()
            if (
                not self.stopped
                and not self.consuming
                and not self._waiting
                and self.slots.value > 0
            ):
                await self._resume()

    async def _pause(self, why: str) -> None:
        tag, self._tag = self._tag, None
        if tag is None:
            return
        self.pauses += 1
        log.info(
            why,
            extra={"agent_id": self.agent_id, "waiting": len(self._waiting)},
        )
        try:
            await self.queue.cancel(tag)
        except Exception as exc:
            log.warning("could not cancel the pool consumer", extra={"error": repr(exc)})

    async def _resume(self) -> None:
        try:
            self._tag = await self.queue.consume(self._on_message)
        except Exception as exc:
            log.warning("could not resume the pool consumer", extra={"error": repr(exc)})
            return
        log.info("intake resumed", extra={"agent_id": self.agent_id})

    async def stop(self) -> None:
        """Take no more deliveries; those waiting for a slot go back to the queue."""
        self.stopped = True
        await self._pause("intake stopped: the pool consumer is cancelled")
        for waiting in list(self._waiting):
            waiting.scope.cancel()
