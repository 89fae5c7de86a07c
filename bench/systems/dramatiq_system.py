"""Dramatiq 2 on RabbitMQ (publisher confirms) with the Results middleware on Redis.

Submits with ``actor.send`` (each publish waits for its confirm), learns results with
``message.get_result(block=True)`` in a collector thread, in submit order. Workers:
``bench.systems.dramatiq_worker``, one OS process each.
"""

from __future__ import annotations

import os
import time
from importlib.metadata import version

import dramatiq
from dramatiq.results import ResultTimeout

from bench.infra import RunContext
from bench.procs import ManagedProcess
from bench.systems.base import TaskSpec, ThreadedBatchSystem, WorkerSet
from bench.systems.dramatiq_app import QUEUE, QUEUE_TYPE, build

THROUGHPUT_THREADS = int(os.environ.get("BENCH_DRAMATIQ_THREADS", "8"))
BLOCK_SLICE = 3.0  # seconds per blocking result read
SUBMIT_THREADS = int(os.environ.get("BENCH_DRAMATIQ_SUBMIT_THREADS", "4"))


class DramatiqSystem(ThreadedBatchSystem[dramatiq.Message[object]]):
    name = "dramatiq"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.workers = WorkerSet(ctx, self.name)
        self.app = build(ctx.amqp_url, ctx.redis_url, ctx.prefix)
        self.submit_threads = SUBMIT_THREADS
        self._settings: dict[str, object] = {}

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {name: version(name) for name in ("dramatiq", "pika", "redis")}

    def settings(self) -> dict[str, object]:
        return self._settings

    def start_workers(self, n_processes: int, concurrency: int | None) -> None:
        threads = THROUGHPUT_THREADS if concurrency is None else concurrency
        self._settings = {
            "worker_processes": n_processes,
            "worker_threads": threads,
            "prefetch": 2 * threads,
            "queue": QUEUE_TYPE,
            "submit_threads_unpaced": self.submit_threads,
        }
        self.workers.start(
            "bench.systems.dramatiq_worker",
            n_processes,
            args=lambda i: ["--threads", str(threads)],
            env=lambda i: {},
            ready_queue=QUEUE,
        )

    def worker_processes(self) -> list[ManagedProcess]:
        return list(self.workers.processes)

    def stop_workers(self) -> None:
        self.workers.stop()

    def submit(self, spec: TaskSpec) -> dramatiq.Message[object]:
        if spec.kind == "noop":
            return self.app.noop.send()
        if spec.kind == "stamp":
            return self.app.stamp.send(spec.bench_id, self.ctx.sink)
        return self.app.sleep.send(spec.bench_id, spec.seconds, self.ctx.sink)

    def wait_result(self, spec: TaskSpec, handle: dramatiq.Message[object], timeout: float) -> None:
        # Block in slices shorter than redis-py's default socket timeout (5 s since redis-py 8):
        # Dramatiq's BRPOPLPUSH for a longer wait fails with a socket timeout instead.
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no result for {spec.bench_id} within {timeout:.0f} s")
            try:
                handle.get_result(
                    backend=self.app.backend,
                    block=True,
                    timeout=max(1000, int(min(remaining, BLOCK_SLICE) * 1000)),
                )
                return
            except ResultTimeout:
                continue

    def close(self) -> None:
        self.app.broker.close()
