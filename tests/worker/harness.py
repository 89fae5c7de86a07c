"""Test harness for the agent: a broker client that publishes tasks and collects events, and
an in-process agent run inside a task group."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aio_pika
import anyio
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from rexec.dispatcher import topology
from rexec.schemas import messages, names
from rexec.schemas.settings import Settings
from rexec.schemas.signing import SIGNATURE_HEADER
from rexec.worker.agent import Agent
from tests.support import REPO, SIGNER, await_until, free_port
from tests.worker.fake_api import FakeApi, serve_fake_api

E = TypeVar("E", bound=messages.TaskEvent)
T = TypeVar("T")


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting for its parent to reap it counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def until(predicate: Callable[[], T], within: float = 10.0, what: str = "condition") -> T:
    """``await_until`` for a plain (non-async) predicate, polled without blocking the loop."""

    async def check() -> T:
        return predicate()

    return await await_until(check, within, what)


def task(
    pool: str,
    target: str = "tests.tasks:add",
    *,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    argv: list[str] | None = None,
    timeout: float | None = None,
    expires_at: float | None = None,
    attempt: int = 1,
    task_id: str | None = None,
) -> messages.TaskMessage:
    kind: messages.TaskKind = "command" if argv is not None else "function"
    return messages.TaskMessage(
        task_id=task_id or uuid.uuid4().hex,
        attempt=attempt,
        pool=pool,
        kind=kind,
        target=argv[0] if argv else target,
        argv=argv or [],
        args=args if args is not None else ([1, 2] if target == "tests.tasks:add" else []),
        kwargs=kwargs or {},
        timeout=timeout,
        expires_at=expires_at,
        submitted_at=time.time(),
    )


class Broker:
    """The dispatcher's side of the wire, as far as the agent tests need it."""

    def __init__(self, connection: AbstractRobustConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self.events: list[messages.Event] = []

    async def _on_events(self, message: AbstractIncomingMessage) -> None:
        self.events.extend(messages.decode_events(message.body).events)
        await message.ack()

    async def publish(
        self,
        pool: str,
        body: messages.TaskMessage | messages.TaskBatch | bytes,
        headers: dict[str, str] | None = None,
        *,
        signed: bool = True,
        batch: bool | None = None,
    ) -> None:
        """Publish as the relay does: signed with the orchestration plane's (test) key, typed
        as a batch for a ``TaskBatch`` (or raw bytes with ``batch=True``)."""
        data = body if isinstance(body, bytes) else messages.encode(body)
        if batch is None:
            batch = isinstance(body, messages.TaskBatch)
        exchange = await self.channel.get_exchange(names.TASKS_EXCHANGE, ensure=False)
        signature = {SIGNATURE_HEADER: SIGNER.sign(data)} if signed else {}
        await exchange.publish(
            aio_pika.Message(
                data,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={**signature, **(headers or {})} or None,
                type=messages.TASK_BATCH_TYPE if batch else messages.TASK_TYPE,
            ),
            routing_key=pool,
        )

    async def control(self, agent_id: str, control: messages.Control) -> None:
        exchange = await self.channel.get_exchange(names.CONTROL_EXCHANGE, ensure=False)
        await exchange.publish(aio_pika.Message(messages.encode(control)), routing_key=agent_id)

    async def ready(self, queue: str) -> list[bytes]:
        """Bodies of the messages ready in a queue, left in it.

        Takes them with basic.get and requeues them: a quorum queue's declare-ok count lags.
        """
        declared = await self.channel.declare_queue(queue, passive=True)
        taken: list[AbstractIncomingMessage] = []
        while (message := await declared.get(fail=False)) is not None:
            taken.append(message)
        for message in taken:
            await message.nack(requeue=True)
        return [m.body for m in taken]

    async def wait_ready(self, queue: str, count: int, within: float = 5.0) -> list[bytes]:
        """Poll until ``count`` messages are ready in ``queue`` (requeues settle async)."""
        bodies: list[bytes] = []

        async def settled() -> bool:
            bodies[:] = await self.ready(queue)
            return len(bodies) == count

        await await_until(settled, within, f"{count} ready message(s) in {queue}")
        return bodies

    async def dead_letters(self, pool: str) -> list[AbstractIncomingMessage]:
        queue = await self.channel.declare_queue(names.dead_queue(pool), passive=True)
        found = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            found.append(message)
        return found

    async def wait_dead_letters(
        self, pool: str, within: float = 10.0
    ) -> list[AbstractIncomingMessage]:
        found: list[AbstractIncomingMessage] = []

        async def arrived() -> bool:
            found.extend(await self.dead_letters(pool))
            return bool(found)

        await await_until(arrived, within, f"a message in {names.dead_queue(pool)}")
        return found

    def of(self, task_id: str) -> list[messages.TaskEvent]:
        return [
            e for e in self.events if isinstance(e, messages.TaskEvent) and e.task_id == task_id
        ]

    async def wait_for(self, task_id: str, kind: type[E], within: float = 10.0) -> E:
        async def found() -> E | None:
            for event in self.of(task_id):
                if isinstance(event, kind):
                    return event
            return None

        event = await await_until(found, within, f"{kind.__name__} of task {task_id}")
        assert event is not None
        return event

    async def terminal(self, task_id: str, within: float = 10.0) -> messages.TaskEvent:
        async def found() -> messages.TaskEvent | None:
            for event in self.of(task_id):
                if isinstance(event, messages.TERMINAL_EVENTS):
                    return event
            return None

        event = await await_until(found, within, f"terminal event of task {task_id}")
        assert event is not None
        return event

    async def run(self, pool: str, message: messages.TaskMessage) -> messages.TaskEvent:
        await self.publish(pool, message)
        return await self.terminal(message.task_id)


@asynccontextmanager
async def open_broker(amqp_url: str) -> AsyncIterator[Broker]:
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await topology.declare_core(channel)
        broker = Broker(connection, channel)
        events = await channel.declare_queue(names.EVENTS_QUEUE, passive=True)
        await events.consume(broker._on_events)
        yield broker
    finally:
        await connection.close()


@asynccontextmanager
async def running_agent(
    broker: Broker,
    settings: Settings,
    pool: str,
    *,
    allow: Sequence[str] = ("tests.tasks:*",),
    concurrency: int = 2,
    control: bool = True,
    agent_class: type[Agent] = Agent,
    **options: Any,
) -> AsyncIterator[Agent]:
    """An agent running in this process; shut down (immediately) when the block exits."""
    agent_id = f"a{uuid.uuid4().hex[:10]}"
    if control:
        await topology.declare_agent_queue(broker.channel, agent_id)
    agent = agent_class(
        settings, agent_id=agent_id, pool=pool, allow=allow, concurrency=concurrency, **options
    )
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        try:
            yield agent
        finally:
            with anyio.fail_after(60):
                await agent.shutdown(immediate=True)


@asynccontextmanager
async def fake_registration(
    broker: Broker, settings: Settings, pool: str, prefix: str
) -> AsyncIterator[tuple[FakeApi, str, dict[str, str]]]:
    """A registration endpoint that admits one agent of ``pool`` (its control queue declared),
    with the agent's id and the environment a real ``rexec-agent`` process needs to use it."""
    agent_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    await topology.declare_agent_queue(broker.channel, agent_id)
    api = FakeApi(
        body={
            "agent_id": agent_id,
            "pool": pool,
            "heartbeat_ttl": 3.0,
            "protocol_version": 1,
            "signing_public_keys": [SIGNER.public_key],
        }
    )
    with serve_fake_api(api):
        yield (
            api,
            agent_id,
            {
                "REXEC_API_URL": api.url,
                "REXEC_AGENT_TOKEN": "secret",
                "REXEC_AMQP_URL": settings.amqp_url,
                "REXEC_REDIS_URL": settings.redis_url,
                "REXEC_REDIS_PREFIX": settings.redis_prefix,
                "REXEC_HEALTH_PORT": str(free_port()),
                "REXEC_LOG_DIR": settings.log_dir,
                "PYTHONPATH": str(REPO),
            },
        )
