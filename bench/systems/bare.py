"""A bare aio-pika producer/consumer pair: the physical limit for a Python client on this broker.

Persistent messages, publisher confirms (pipelined: many publishes await their confirm at once),
quorum queues, manual acks, one persistent result message per task on a reply queue
(``bench.results``), workers handling deliveries concurrently (``bench.systems.bare_worker``).
No lease, no heartbeat, no retry policy: what is left is the broker round trips themselves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.metadata import version

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from bench.infra import RunContext
from bench.procs import ManagedProcess
from bench.systems.bare_worker import QUEUE_ARGUMENTS, RESULT_QUEUE, TASK_QUEUE
from bench.systems.base import AsyncBatchSystem, TaskSpec, WorkerSet

THROUGHPUT_PREFETCH = 256  # per worker, when no concurrency is imposed
THROUGHPUT_THREADS = 8


class BareSystem(AsyncBatchSystem):
    name = "bare"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.workers = WorkerSet(ctx, self.name)
        self._connection: AbstractConnection | None = None
        self._publish: AbstractChannel | None = None
        self._settings: dict[str, object] = {}

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {"aio-pika": version("aio-pika"), "aiormq": version("aiormq")}

    def settings(self) -> dict[str, object]:
        return self._settings

    def start_workers(self, n_processes: int, concurrency: int | None) -> None:
        prefetch = THROUGHPUT_PREFETCH if concurrency is None else concurrency
        threads = THROUGHPUT_THREADS if concurrency is None else concurrency
        self._settings = {
            "worker_processes": n_processes,
            "prefetch_per_worker": prefetch,
            "threads_per_worker": threads,
            "queues": "quorum",
            "submit_window": self.max_in_flight,
        }
        self.workers.start(
            "bench.systems.bare_worker",
            n_processes,
            args=lambda i: ["--prefetch", str(prefetch), "--threads", str(threads)],
            env=lambda i: {},
            ready_queue=TASK_QUEUE,
        )

    def worker_processes(self) -> list[ManagedProcess]:
        return list(self.workers.processes)

    def stop_workers(self) -> None:
        self.workers.stop()

    async def open(self, on_result: Callable[[str, str | None], None]) -> None:
        self._connection = await aio_pika.connect(self.ctx.amqp_url)
        self._publish = await self._connection.channel(publisher_confirms=True)
        await self._publish.declare_queue(TASK_QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)
        consume = await self._connection.channel()
        await consume.set_qos(prefetch_count=1000)
        results = await consume.declare_queue(RESULT_QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)

        async def on_message(message: AbstractIncomingMessage) -> None:
            body = json.loads(message.body)
            on_result(str(body["id"]), body["error"])
            await message.ack()

        await results.consume(on_message, no_ack=False)

    async def submit(self, spec: TaskSpec) -> None:
        assert self._publish is not None
        body = {"id": spec.bench_id, "kind": spec.kind, "seconds": spec.seconds}
        if spec.kind != "noop":
            body["sink"] = self.ctx.sink
        await self._publish.default_exchange.publish(
            aio_pika.Message(
                json.dumps(body).encode(),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                reply_to=RESULT_QUEUE,
                correlation_id=spec.bench_id,
            ),
            routing_key=TASK_QUEUE,
            mandatory=True,
        )

    async def aclose(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
            self._publish = None
