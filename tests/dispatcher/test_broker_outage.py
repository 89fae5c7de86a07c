"""The relay and the events consumer while the broker is away (its restart: tests/faults).

Both reproduce, without restarting anything, what ``aio_pika`` does during a reconnection:
publishing or acking on a robust channel being restored raises ``ChannelInvalidStateError``
(a ``RuntimeError``, not an ``AMQPError``), and opening a channel raises a bare
``RuntimeError``.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractExchange
from aiormq.exceptions import ChannelInvalidStateError
from sqlalchemy import func, select

from rexec.dispatcher import events
from rexec.dispatcher.db.models import Outbox, Pool, Task
from rexec.dispatcher.relay import relay_once
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import names
from rexec.schemas.api import TaskState


class ChannelBeingRestored:
    """An exchange whose publishes fail as they do while the connection is reconnecting."""

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        raise ChannelInvalidStateError("<RobustChannel> closed")


async def outbox_rows(rt: Runtime, task_id: str) -> int:
    async with rt.sessions() as session:
        count = await session.scalar(
            select(func.count()).select_from(Outbox).where(Outbox.task_id == task_id)
        )
    return int(count or 0)


@pytest.mark.anyio
async def test_a_publish_failing_during_a_reconnection_leaves_the_row_and_raises_plainly(
    rt: Runtime, pool_name: str
) -> None:
    """Raised inside the relay's task group, the error used to come out as an ExceptionGroup
    that ``run_relay`` did not catch: the whole dispatcher exited."""
    now = time.time()
    async with rt.sessions.begin() as session:
        session.add(Pool(name=pool_name, description="", draining=False, created_at=now))
        task = Task(
            id=f"t-{pool_name}",
            pool=pool_name,
            kind="function",
            target="tests.tasks:add",
            args_json="[1, 2]",
            kwargs_json="{}",
            argv_json="[]",
            state=TaskState.QUEUED.value,
            attempt=1,
            max_attempts=3,
            retry_backoff=0.0,
            created_at=now,
            cancel_requested=False,
        )
        session.add(task)
        await session.flush()
        session.add(Outbox(task_id=task.id, attempt=1, available_at=now))
    await rt.declare_pool(pool_name)

    with pytest.raises(ChannelInvalidStateError):
        await relay_once(rt, cast(AbstractExchange, ChannelBeingRestored()))
    assert await outbox_rows(rt, task.id) == 1, "kept for the next round"

    exchange = await rt.exchange(names.TASKS_EXCHANGE)
    for _ in range(20):  # other tests' rows may come first
        await relay_once(rt, exchange)
        if await outbox_rows(rt, task.id) == 0:
            break
    assert await outbox_rows(rt, task.id) == 0


class ClosedByTheBroker:
    """A robust channel the broker closed under the consumer: ``is_closed`` is already true."""

    is_closed = True

    def __init__(self, fail_at: str) -> None:
        self.fail_at = fail_at
        self.closed_by_us = False

    async def initialize(self) -> None:
        if self.fail_at == "initialize":
            raise RuntimeError("Connection was not opened")

    async def set_qos(self, **kwargs: Any) -> None:
        raise ChannelInvalidStateError("<RobustChannel> closed")

    async def close(self, exc: BaseException | None = None) -> None:
        self.closed_by_us = True


@pytest.mark.anyio
@pytest.mark.parametrize("fail_at", ["initialize", "set_qos"])
async def test_the_events_consumer_closes_its_channel_for_good_whatever_failed(
    fail_at: str,
) -> None:
    """Unless we close it, the robust connection restores the channel with its consumer once
    the broker is back: a zombie that takes events into a stream nobody reads any more and
    holds them unacked for as long as the dispatcher lives."""
    channel = ClosedByTheBroker(fail_at)
    rt = SimpleNamespace(connection=SimpleNamespace(channel=lambda **_: channel))
    with pytest.raises(RuntimeError):
        await events._consume(cast(Runtime, rt))
    assert channel.closed_by_us
