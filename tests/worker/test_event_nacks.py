"""A batch of events the broker nacks is published again on a fresh channel, not dropped.

The broker here really nacks: the first exchange routes to a queue that refuses every
message (``x-max-length`` 0 with ``reject-publish``). The cluster fault test
(tests/faults/test_cluster.py) is where RabbitMQ did it on its own, after a node loss.
"""

from __future__ import annotations

import aio_pika
import anyio
import pytest
from aio_pika.abc import AbstractExchange

from rexec.schemas import messages
from rexec.worker.events import EventPublisher
from tests.support import await_until

pytestmark = pytest.mark.anyio


async def test_a_nacked_batch_goes_out_again_on_a_fresh_channel(amqp_url: str) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        setup = await connection.channel()
        refusing = await setup.declare_queue(
            exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        accepting = await setup.declare_queue(exclusive=True)
        refuser = await setup.declare_exchange(
            f"{refusing.name}.x", aio_pika.ExchangeType.FANOUT, auto_delete=True
        )
        acceptor = await setup.declare_exchange(
            f"{accepting.name}.x", aio_pika.ExchangeType.FANOUT, auto_delete=True
        )
        await refusing.bind(refuser)
        await accepting.bind(acceptor)
        nacking = await (await connection.channel()).get_exchange(refuser.name)
        fresh: list[AbstractExchange] = []

        async def renew() -> AbstractExchange:
            fresh.append(await (await connection.channel()).get_exchange(acceptor.name))
            return fresh[-1]

        publisher = EventPublisher(nacking, renew=renew)
        event = messages.Started(task_id="t", attempt=1, agent_id="a", at=0.0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher.run)
            with anyio.fail_after(10):
                await publisher.emit(event)
            publisher.close()
        assert (publisher.renewals, len(fresh)) == (1, 1)
        message = await await_until(lambda: accepting.get(fail=False), 5, "the batch")
        assert messages.decode_events(message.body).events == [event]
    finally:
        await connection.close()
