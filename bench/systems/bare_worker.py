"""Worker of the bare aio-pika pair: ``python -m bench.systems.bare_worker``.

Consumes ``bench.tasks`` (quorum) with manual acks, handles deliveries concurrently (one asyncio
task each, up to the prefetch count), publishes one persistent result per task to the message's
``reply_to`` queue and waits for its publisher confirm, then acks the delivery. Sleeping tasks
run in a thread pool of ``--concurrency`` threads; no-op and stamp tasks run inline.

Environment: ``BENCH_AMQP_URL`` (from ``RunContext.worker_env``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from pamqp.common import FieldTable

from bench import tasks

TASK_QUEUE = "bench.tasks"
RESULT_QUEUE = "bench.results"
QUEUE_ARGUMENTS: FieldTable = {"x-queue-type": "quorum"}


def run_task(body: dict[str, object]) -> None:
    kind = body["kind"]
    bench_id = str(body["id"])
    if kind == "noop":
        tasks.noop()
    elif kind == "stamp":
        tasks.stamp(bench_id, str(body["sink"]))
    elif kind == "sleep":
        seconds = body["seconds"]
        assert isinstance(seconds, int | float)
        tasks.sleep_record(bench_id, float(seconds), str(body["sink"]))
    else:
        raise ValueError(f"unknown task kind {kind!r}")


async def main(prefetch: int, threads: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    executor = ThreadPoolExecutor(max_workers=threads)
    connection = await aio_pika.connect(os.environ["BENCH_AMQP_URL"])
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(TASK_QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)
    running: set[asyncio.Task[None]] = set()

    async def handle(message: AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        error: str | None = None
        try:
            if body["kind"] == "sleep":
                await loop.run_in_executor(executor, run_task, body)
            else:
                run_task(body)
        except Exception as exc:
            error = repr(exc)
        reply = json.dumps({"id": body["id"], "error": error}).encode()
        await channel.default_exchange.publish(
            aio_pika.Message(
                reply,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                correlation_id=str(body["id"]),
            ),
            routing_key=message.reply_to or RESULT_QUEUE,
        )
        await message.ack()

    async def on_message(message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(handle(message))
        running.add(task)
        task.add_done_callback(running.discard)

    tag = await queue.consume(on_message, no_ack=False)
    print(f"bare worker {os.getpid()} consuming (prefetch {prefetch}, threads {threads})")
    await stop.wait()
    await queue.cancel(tag)
    if running:
        await asyncio.wait(running, timeout=10)
    await connection.close()
    executor.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefetch", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    options = parser.parse_args()
    asyncio.run(main(options.prefetch, options.threads))
