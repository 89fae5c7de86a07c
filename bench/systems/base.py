"""The interface every benchmarked system implements, and helpers for implementing it.

The workloads (``bench.workloads``) are shared: they time, pace, inject faults and count. A
system only knows how to start and stop its workers and how to run a batch of tasks from the
submitting process (the harness process itself). One instance serves one run (one workload, one
repetition) inside a fresh RabbitMQ vhost and Redis key prefix (``bench.infra.RunContext``).

To add a system (the rexec runner is ``bench/systems/rexec_system.py``, class ``RexecSystem``):

    class RexecSystem(System):
        name = "rexec"

        def __init__(self, ctx: RunContext) -> None: ...
            # ctx.amqp_url (own vhost), ctx.redis_url + ctx.prefix (own keys), ctx.log_dir,
            # ctx.sink (pass it to the bench.tasks functions), ctx.worker_env(i) (env for worker i)

        @classmethod
        def versions(cls) -> dict[str, str]: ...
            # package -> version, recorded in the results

        def settings(self) -> dict[str, object]: ...
            # the tuning used (recorded in the results); optional

        def start_workers(self, n_processes: int, concurrency: int | None) -> None: ...
            # Start n_processes worker processes (agents), each running `concurrency` tasks at a
            # time (None: the system's own best setting for throughput). Return only when they
            # consume (deadline!). Anything else the system needs (a dispatcher) starts here too.
            # Start processes with bench.procs.start_module(...) and give worker i the env
            # ctx.worker_env(i), so the fault workloads can find and signal it.

        def worker_processes(self) -> list[ManagedProcess]: ...
            # the workers started, index i = BENCH_WORKER_INDEX i (W3/W4 kill or stop one)

        def stop_workers(self) -> None: ...
            # stop every process started (also killed or SIGSTOPped ones); must not raise

        def run_batch(
            self, tasks: Sequence[TaskSpec], rate: float | None, timeout: float
        ) -> BatchResult: ...
            # Submit every task (as fast as possible if rate is None, else `rate` per second on
            # the schedule of bench.systems.base.schedule), and collect results until all are
            # known or `timeout` seconds after the first submit. Never raise for a task that
            # failed or is missing: report it. Task kinds map to bench.tasks functions:
            # "noop" -> noop(), "stamp" -> stamp(bench_id, ctx.sink),
            # "sleep" -> sleep_record(bench_id, seconds, ctx.sink).

        def close(self) -> None: ...
            # release clients; called after stop_workers(), also on errors

Two helpers implement ``run_batch`` for you: :class:`ThreadedBatchSystem` (blocking clients: a
submit call per task, results awaited in submit order by a collector thread) and
:class:`AsyncBatchSystem` (asyncio clients: pipelined submits, results pushed by a callback).
:class:`WorkerSet` starts ``python -m <module>`` workers and waits for their AMQP consumers.

A system whose module cannot be imported (``ImportError``) or whose ``check_available()`` raises
is reported as skipped by ``bench.run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Literal, TypeVar

from bench.infra import RunContext, wait_for_consumers
from bench.procs import ManagedProcess, start_module

TaskKind = Literal["noop", "stamp", "sleep"]


@dataclass(frozen=True)
class TaskSpec:
    bench_id: str  # the harness's id for the task, unique in the run
    kind: TaskKind
    seconds: float = 0.0  # only for "sleep"


@dataclass
class BatchResult:
    submitted: dict[str, float] = field(default_factory=dict)  # id -> wall time before submit
    done: dict[str, float] = field(default_factory=dict)  # id -> wall time the result was known
    failed: dict[str, str] = field(default_factory=dict)  # id -> error (task or submit failed)

    @property
    def first_submit(self) -> float:
        return min(self.submitted.values())

    @property
    def last_done(self) -> float:
        return max(self.done.values())


class System(ABC):
    name: ClassVar[str]

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    @classmethod
    def check_available(cls) -> None:
        """Raise (with a reason) if this system cannot run here; the run then skips it."""
        return None

    @classmethod
    @abstractmethod
    def versions(cls) -> dict[str, str]: ...

    def settings(self) -> dict[str, object]:
        return {}

    @abstractmethod
    def start_workers(self, n_processes: int, concurrency: int | None) -> None: ...

    @abstractmethod
    def worker_processes(self) -> list[ManagedProcess]: ...

    @abstractmethod
    def stop_workers(self) -> None: ...

    @abstractmethod
    def run_batch(
        self, tasks: Sequence[TaskSpec], rate: float | None, timeout: float
    ) -> BatchResult: ...

    def close(self) -> None:
        return None


def schedule(index: int, rate: float | None, t0: float) -> float:
    """Wall time at which task ``index`` is due (``t0`` for all when rate is None)."""
    return t0 if rate is None else t0 + index / rate


class WorkerSet:
    """Worker processes ``python -m module`` of one run, worker i with ``ctx.worker_env(i)``."""

    def __init__(self, ctx: RunContext, system: str) -> None:
        self.ctx = ctx
        self.system = system
        self.processes: list[ManagedProcess] = []

    def start(
        self,
        module: str,
        n_processes: int,
        args: Callable[[int], list[str]],
        env: Callable[[int], dict[str, str]],
        ready_queue: str,
        consumers_per_process: int = 1,
        timeout: float = 60.0,
    ) -> None:
        for i in range(n_processes):
            self.processes.append(
                start_module(
                    f"{self.system}-worker-{i}",
                    module,
                    args(i),
                    {**self.ctx.worker_env(i), **env(i)},
                    self.ctx.log_dir / f"{self.system}-worker-{i}.log",
                )
            )
        try:
            wait_for_consumers(
                self.ctx.amqp_url, ready_queue, n_processes * consumers_per_process, timeout
            )
        except TimeoutError as exc:
            logs = "\n".join(f"--- {p.name}:\n{p.tail()}" for p in self.processes)
            raise TimeoutError(f"{exc}\n{logs}") from exc

    def stop(self, timeout: float = 5.0) -> None:
        for proc in self.processes:
            proc.stop(timeout)
        self.processes.clear()


H = TypeVar("H")


class ThreadedBatchSystem(System, Generic[H]):
    """``run_batch`` for blocking clients: submit in this thread, await results in another.

    The collector waits for results in submit order, so a result that arrives before an earlier
    task's is timed when the collector reaches it (at most the gap to the earlier one).
    With ``submit_threads`` > 1, a batch without a rate is submitted from that many threads
    (each blocking submit then overlaps the others' round trips); paced batches use one.
    """

    submit_threads: int = 1

    @abstractmethod
    def submit(self, spec: TaskSpec) -> H:
        """Submit one task; return a handle for :meth:`wait_result`. Raise if not accepted."""

    @abstractmethod
    def wait_result(self, spec: TaskSpec, handle: H, timeout: float) -> None:
        """Block until the task's result is known; TimeoutError after ``timeout`` seconds.

        Called from the collector thread. Any other exception marks the task failed.
        """

    def run_batch(
        self, tasks: Sequence[TaskSpec], rate: float | None, timeout: float
    ) -> BatchResult:
        result = BatchResult()
        handles: queue.Queue[tuple[TaskSpec, H] | None] = queue.Queue()
        t0 = time.time()
        deadline = t0 + timeout
        collector = threading.Thread(
            target=self._collect, args=(handles, result, deadline), daemon=True
        )
        collector.start()
        n_threads = self.submit_threads if rate is None else 1
        try:
            if n_threads == 1:
                self._submit_all(tasks, rate, t0, deadline, result, handles)
            else:
                submitters = [
                    threading.Thread(
                        target=self._submit_all,
                        args=(tasks[k::n_threads], None, t0, deadline, result, handles),
                        daemon=True,
                    )
                    for k in range(n_threads)
                ]
                for thread in submitters:
                    thread.start()
                for thread in submitters:
                    thread.join(timeout=max(0.0, deadline - time.time()) + 30)
        finally:
            handles.put(None)
            collector.join(timeout=max(0.0, deadline - time.time()) + 30)
        return result

    def _submit_all(
        self,
        tasks: Sequence[TaskSpec],
        rate: float | None,
        t0: float,
        deadline: float,
        result: BatchResult,
        handles: queue.Queue[tuple[TaskSpec, H] | None],
    ) -> None:
        for i, spec in enumerate(tasks):
            delay = schedule(i, rate, t0) - time.time()
            if delay > 0:
                time.sleep(delay)
            if time.time() >= deadline:
                return
            submitted_at = time.time()
            try:
                handle = self.submit(spec)
            except Exception as exc:
                result.failed[spec.bench_id] = f"submit: {exc!r}"
                continue
            result.submitted[spec.bench_id] = submitted_at
            handles.put((spec, handle))

    def _collect(
        self,
        handles: queue.Queue[tuple[TaskSpec, H] | None],
        result: BatchResult,
        deadline: float,
    ) -> None:
        while True:
            item = handles.get()
            if item is None:
                return
            spec, handle = item
            try:
                self.wait_result(spec, handle, max(0.05, deadline - time.time()))
            except TimeoutError:
                continue  # missing; later ones are still checked (each gets >= 50 ms)
            except Exception as exc:
                result.failed[spec.bench_id] = repr(exc)
                continue
            result.done[spec.bench_id] = time.time()


class AsyncBatchSystem(System):
    """``run_batch`` for asyncio clients: pipelined submits, results reported by callback."""

    max_in_flight: ClassVar[int] = 2000  # submits awaiting their confirmation at once

    @abstractmethod
    async def open(self, on_result: Callable[[str, str | None], None]) -> None:
        """Connect and start receiving results: call ``on_result(bench_id, error_or_None)``."""

    @abstractmethod
    async def submit(self, spec: TaskSpec) -> None:
        """Submit one task; return once the system accepted it (e.g. publisher confirm)."""

    @abstractmethod
    async def aclose(self) -> None: ...

    def run_batch(
        self, tasks: Sequence[TaskSpec], rate: float | None, timeout: float
    ) -> BatchResult:
        return asyncio.run(self._run_batch(tasks, rate, timeout))

    async def _run_batch(
        self, tasks: Sequence[TaskSpec], rate: float | None, seconds: float
    ) -> BatchResult:
        result = BatchResult()
        expected = {spec.bench_id for spec in tasks}
        all_known = asyncio.Event()

        def on_result(bench_id: str, error: str | None) -> None:
            if bench_id not in expected or bench_id in result.done or bench_id in result.failed:
                return
            if error is None:
                result.done[bench_id] = time.time()
            else:
                result.failed[bench_id] = error
            if len(result.done) + len(result.failed) >= len(expected):
                all_known.set()

        await asyncio.wait_for(self.open(on_result), timeout=30)
        window = asyncio.Semaphore(self.max_in_flight)
        pending: set[asyncio.Task[None]] = set()

        async def submit_one(spec: TaskSpec) -> None:
            try:
                await self.submit(spec)
            except Exception as exc:
                result.failed[spec.bench_id] = f"submit: {exc!r}"
                if len(result.done) + len(result.failed) >= len(expected):
                    all_known.set()
            finally:
                window.release()

        t0 = time.time()
        deadline = t0 + seconds
        try:
            for i, spec in enumerate(tasks):
                delay = schedule(i, rate, t0) - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                remaining = deadline - time.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(window.acquire(), timeout=remaining)
                except TimeoutError:
                    break
                result.submitted[spec.bench_id] = time.time()
                task = asyncio.create_task(submit_one(spec))
                pending.add(task)
                task.add_done_callback(pending.discard)
            remaining = max(0.0, deadline - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_known.wait(), timeout=remaining)
        finally:
            for task in list(pending):
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            await asyncio.wait_for(self.aclose(), timeout=30)
        return result
