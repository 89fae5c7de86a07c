"""The four workloads, the same code for every system.

Each function takes a started-nothing :class:`System` (in its own vhost and Redis prefix),
starts its workers, runs, and returns a flat dict of figures (None where a figure does not
exist, e.g. the failover time when tasks are missing). The caller stops the workers.

- W1 throughput: ``n`` no-op tasks, from the first submit until the submitter knows every result.
- W2 latency: ``rate`` tasks/s for ``seconds``; submit-to-start and submit-to-result percentiles.
- W5 scale (rexec only): see ``bench.scale``.
- W3/W4 failover: two workers of concurrency 4, 40 tasks of 2 s; 1.5 s after the first task
  starts, SIGKILL (W3) or SIGSTOP (W4) the worker that started it (its whole process tree);
  results are collected until ``cap`` seconds after the first submit; for W4 the worker gets
  SIGCONT afterwards, and the harness watches ``seconds + 2`` s more for stale executions that
  then complete (counted in ``run_twice``).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from bench.records import Records, execution_counts
from bench.stats import percentile
from bench.systems.base import System, TaskSpec

WORKER_PROCESSES = 2


@dataclass(frozen=True)
class Sizes:
    w1_tasks: int = 20_000
    w1_timeout: float = 600.0
    w2_rate: float = 200.0
    w2_seconds: float = 15.0
    failover_tasks: int = 40
    failover_task_seconds: float = 2.0
    failover_concurrency: int = 4
    failover_fault_after: float = 1.5
    failover_cap: float = 120.0
    scale_tasks: int = 100_000
    scale_pools: int = 20
    scale_agents: int = 50
    scale_concurrency: int = 1
    scale_timeout: float = 1200.0

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            w1_tasks=2_000,
            w1_timeout=120.0,
            w2_seconds=5.0,
            failover_cap=60.0,
            scale_tasks=5_000,
            scale_pools=4,
            scale_agents=8,
            scale_timeout=300.0,
        )


def _warm_up(
    system: System, kind: Literal["noop", "stamp"], sink_prefix: str, rate: float | None = None
) -> None:
    """A few tasks through every part of the system before timing (not measured), by the path
    the workload times: paced submissions warm up paced (a cold first burst of single
    submissions cost rexec seconds of queueing that no later second of the run has)."""
    specs = [TaskSpec(f"warm-{sink_prefix}-{i}", kind) for i in range(20 if rate is None else 40)]
    system.run_batch(specs, rate, 30.0)


def throughput(system: System, sizes: Sizes) -> dict[str, object]:
    system.start_workers(WORKER_PROCESSES, None)
    _warm_up(system, "noop", "w1")
    specs = [TaskSpec(f"w1-{i}", "noop") for i in range(sizes.w1_tasks)]
    result = system.run_batch(specs, None, sizes.w1_timeout)
    n = len(specs)
    complete = len(result.done) == n
    elapsed = (result.last_done - result.first_submit) if result.done else None
    last_submit = max(result.submitted.values()) if result.submitted else None
    return {
        "tasks": n,
        "completed": len(result.done),
        "failed": len(result.failed),
        "failures": _failure_sample(result.failed),
        "seconds": _round(elapsed),
        "tasks_per_s": _round(n / elapsed if complete and elapsed else None, 1),
        "submit_per_s": _round(
            n / (last_submit - result.first_submit)
            if last_submit and last_submit > result.first_submit
            else None,
            1,
        ),
    }


def latency(system: System, sizes: Sizes) -> dict[str, object]:
    system.start_workers(WORKER_PROCESSES, None)
    _warm_up(system, "stamp", "w2", sizes.w2_rate)
    n = int(sizes.w2_rate * sizes.w2_seconds)
    specs = [TaskSpec(f"w2-{i}", "stamp") for i in range(n)]
    result = system.run_batch(specs, sizes.w2_rate, sizes.w2_seconds + 60.0)
    records = Records(system.ctx.redis_url, system.ctx.prefix)
    try:
        starts = records.starts()
    finally:
        records.close()
    to_start = [
        (starts[i] - t) * 1000
        for i, t in result.submitted.items()
        if i in starts and i in result.done
    ]
    to_result = [
        (result.done[i] - t) * 1000 for i, t in result.submitted.items() if i in result.done
    ]
    submit_span = max(result.submitted.values()) - result.first_submit if result.submitted else 0
    figures: dict[str, object] = {
        "tasks": n,
        "completed": len(result.done),
        "failed": len(result.failed),
        "failures": _failure_sample(result.failed),
        "achieved_rate": _round(
            (len(result.submitted) - 1) / submit_span if submit_span else None, 1
        ),
    }
    for name, values in (("start", to_start), ("result", to_result)):
        for q in (50, 95, 99):
            figures[f"{name}_p{q}_ms"] = _round(percentile(values, q), 1)
    return figures


def failover(system: System, sizes: Sizes, mode: Literal["kill", "stop"]) -> dict[str, object]:
    system.start_workers(WORKER_PROCESSES, sizes.failover_concurrency)
    workers = system.worker_processes()
    records = Records(system.ctx.redis_url, system.ctx.prefix)
    fault: dict[str, object] = {}
    fault_signal = signal.SIGKILL if mode == "kill" else signal.SIGSTOP

    def inject() -> None:
        try:
            first = records.first_start(timeout=sizes.failover_cap)
        except TimeoutError as exc:
            fault["error"] = str(exc)
            return
        victim = None
        if first.worker.isdigit() and int(first.worker) < len(workers):
            victim = workers[int(first.worker)]
        else:
            victim = next((w for w in workers if w.owns_pid(first.pid)), None)
        if victim is None:
            fault["error"] = f"no started worker runs pid {first.pid}"
            return
        delay = first.at + sizes.failover_fault_after - time.time()
        if delay > 0:
            time.sleep(delay)
        fault["at"] = time.time()
        fault["victim"] = workers.index(victim)
        victim.signal_tree(fault_signal)

    injector = threading.Thread(target=inject, daemon=True)
    specs = [
        TaskSpec(f"f-{i}", "sleep", sizes.failover_task_seconds)
        for i in range(sizes.failover_tasks)
    ]
    injector.start()
    try:
        result = system.run_batch(specs, None, sizes.failover_cap)
        injector.join(timeout=sizes.failover_cap)
        if mode == "stop" and "victim" in fault:
            victim_index = fault["victim"]
            assert isinstance(victim_index, int)
            workers[victim_index].signal_tree(signal.SIGCONT)
            # Watch the woken worker finish what it held: stale executions show up here.
            time.sleep(sizes.failover_task_seconds + 2.0)
        events = records.events()
    finally:
        records.close()
    started, ended = execution_counts(events)
    n = len(specs)
    missing = n - len(result.done)
    fault_at = fault.get("at")
    kill_to_last: float | None = None
    in_flight = 0
    if isinstance(fault_at, float):
        if missing == 0:
            kill_to_last = result.last_done - fault_at
        victim = str(fault["victim"])
        began = {
            e.bench_id
            for e in events
            if e.worker == victim and e.phase == "start" and e.at < fault_at
        }
        finished = {
            e.bench_id
            for e in events
            if e.worker == victim and e.phase == "end" and e.at < fault_at
        }
        in_flight = len(began - finished)
    return {
        "tasks": n,
        "completed": len(result.done),
        "failed": len(result.failed),
        "missing": missing,
        "run_twice": sum(1 for count in ended.values() if count > 1),
        "started_twice": sum(1 for count in started.values() if count > 1),
        "in_flight_at_fault": in_flight,
        "fault_to_last_s": _round(kill_to_last, 2),
        "fault_error": fault.get("error"),
        "failures": _failure_sample(result.failed),
    }


def _failure_sample(failed: dict[str, str]) -> list[str] | None:
    """Up to three distinct failure reasons (None when nothing failed)."""
    reasons = sorted(set(failed.values()))
    return reasons[:3] or None


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def crash_failover(system: System, sizes: Sizes) -> dict[str, object]:
    return failover(system, sizes, "kill")


def hang_failover(system: System, sizes: Sizes) -> dict[str, object]:
    return failover(system, sizes, "stop")


def scale(system: System, sizes: Sizes) -> dict[str, object]:
    from bench.scale import scale as run_scale
    from bench.systems.rexec_system import RexecSystem

    if not isinstance(system, RexecSystem):
        raise TypeError(f"W5 scale applies to rexec only, not {system.name}")
    return run_scale(system, sizes)


Workload = Callable[[System, Sizes], dict[str, object]]

WORKLOADS: dict[str, tuple[str, Workload]] = {
    "w1": ("W1 throughput", throughput),
    "w2": ("W2 latency", latency),
    "w3": ("W3 crash failover (SIGKILL)", crash_failover),
    "w4": ("W4 hang failover (SIGSTOP)", hang_failover),
    "w5": ("W5 scale (rexec only)", scale),
}

ONLY_FOR: dict[str, frozenset[str]] = {"w5": frozenset({"rexec"})}
"""Workloads that apply to some systems only (W5 measures rexec's own dispatcher and agents)."""


def applies(workload: str, system: str) -> bool:
    return system in ONLY_FOR.get(workload, frozenset({system}))
