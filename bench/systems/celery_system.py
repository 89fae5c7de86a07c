"""Celery 5 on RabbitMQ with Redis results, with the safety settings of ``celery_app``.

Submits with ``apply_async`` (each publish waits for its confirm: kombu's ``confirm_publish``),
and learns results with ``AsyncResult.get`` (Redis pub/sub) in a collector thread, in submit
order. Workers: ``bench.systems.celery_worker``, one OS process each.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from importlib.metadata import version

import celery.exceptions
from celery import Celery
from celery.result import ResultSet

from bench.infra import RunContext
from bench.procs import ManagedProcess
from bench.systems.base import BatchResult, TaskSpec, ThreadedBatchSystem, WorkerSet
from bench.systems.celery_app import QUEUE, TUNING, make_app

# Throughput tuning (no concurrency imposed): found by trying pools and prefetch on this kind
# of machine; overridable for experiments.
THROUGHPUT_POOL = os.environ.get("BENCH_CELERY_POOL", "threads")
THROUGHPUT_CONCURRENCY = int(os.environ.get("BENCH_CELERY_CONCURRENCY", "8"))
THROUGHPUT_PREFETCH_MULTIPLIER = int(os.environ.get("BENCH_CELERY_PREFETCH_MULTIPLIER", "16"))
SUBMIT_THREADS = int(os.environ.get("BENCH_CELERY_SUBMIT_THREADS", "4"))
# How an unpaced batch learns its results: "join" (submit everything, then
# ResultSet.join_native, Celery's bulk path) or "thread" (a collector thread, as paced batches).
COLLECT = os.environ.get("BENCH_CELERY_COLLECT", "thread")


class CelerySystem(ThreadedBatchSystem[str]):
    name = "celery"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.workers = WorkerSet(ctx, self.name)
        self.app: Celery = make_app(ctx.amqp_url, ctx.redis_url, ctx.prefix)
        self._settings: dict[str, object] = {}
        self.submit_threads = SUBMIT_THREADS

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {name: version(name) for name in ("celery", "kombu", "amqp", "redis")}

    def settings(self) -> dict[str, object]:
        return self._settings

    def start_workers(self, n_processes: int, concurrency: int | None) -> None:
        if concurrency is None:
            pool, conc, multiplier = (
                THROUGHPUT_POOL,
                THROUGHPUT_CONCURRENCY,
                THROUGHPUT_PREFETCH_MULTIPLIER,
            )
        else:
            pool, conc, multiplier = "threads", concurrency, 4  # Celery's default multiplier
        self._settings = {
            "worker_processes": n_processes,
            "pool": pool,
            "concurrency": conc,
            "worker_prefetch_multiplier": multiplier,
            "queue": "quorum",
            "submit_threads_unpaced": self.submit_threads,
            "collect_unpaced": COLLECT,
            **TUNING,
        }
        self.workers.start(
            "bench.systems.celery_worker",
            n_processes,
            args=lambda i: ["--pool", pool, "--concurrency", str(conc)],
            env=lambda i: {"BENCH_CELERY_PREFETCH_MULTIPLIER": str(multiplier)},
            ready_queue=QUEUE,
        )

    def worker_processes(self) -> list[ManagedProcess]:
        return list(self.workers.processes)

    def stop_workers(self) -> None:
        self.workers.stop()

    def submit(self, spec: TaskSpec) -> str:
        if spec.kind == "noop":
            result = self.app.tasks["bench.noop"].apply_async()
        elif spec.kind == "stamp":
            result = self.app.tasks["bench.stamp"].apply_async((spec.bench_id, self.ctx.sink))
        else:
            result = self.app.tasks["bench.sleep"].apply_async(
                (spec.bench_id, spec.seconds, self.ctx.sink)
            )
        return str(result.id)

    def wait_result(self, spec: TaskSpec, handle: str, timeout: float) -> None:
        try:
            self.app.AsyncResult(handle).get(
                timeout=timeout, propagate=True, disable_sync_subtasks=False
            )
        except celery.exceptions.TimeoutError as exc:
            raise TimeoutError(str(exc)) from exc

    def run_batch(
        self, tasks: Sequence[TaskSpec], rate: float | None, timeout: float
    ) -> BatchResult:
        if rate is not None or COLLECT != "join":
            return super().run_batch(tasks, rate, timeout)
        t0 = time.time()
        deadline = t0 + timeout
        result = BatchResult()
        by_celery_id: dict[str, str] = {}
        lock = threading.Lock()

        def submit_part(part: Sequence[TaskSpec]) -> None:
            for spec in part:
                if time.time() >= deadline:
                    return
                submitted_at = time.time()
                try:
                    celery_id = self.submit(spec)
                except Exception as exc:
                    result.failed[spec.bench_id] = f"submit: {exc!r}"
                    continue
                with lock:
                    result.submitted[spec.bench_id] = submitted_at
                    by_celery_id[celery_id] = spec.bench_id

        n = self.submit_threads
        threads = [threading.Thread(target=submit_part, args=(tasks[k::n],)) for k in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.time()) + 30)

        def on_result(celery_id: str, value: object) -> None:
            bench_id = by_celery_id.get(celery_id)
            if bench_id is not None:
                result.done[bench_id] = time.time()

        results = ResultSet([self.app.AsyncResult(cid) for cid in by_celery_id])
        with contextlib.suppress(celery.exceptions.TimeoutError):  # the rest are missing
            results.join_native(
                timeout=max(0.05, deadline - time.time()),
                propagate=False,
                callback=on_result,
                disable_sync_subtasks=False,
            )
        return result

    def close(self) -> None:
        self.app.close()
