"""W5 scale (rexec only): many queued tasks over many pools and agents; memory of each part.

One dispatcher (``rexec serve``, SQLite), ``scale_pools`` pools, ``scale_tasks`` no-op tasks
submitted round-robin over the pools while no agent runs, so they all sit queued (the outbox
drained into the pools' queues). Then ``scale_agents`` agents start, each its own
``rexec-agent`` process (agent i serves pool i mod pools, ``scale_concurrency`` slots, so one
child process each), and run every task. A sampler reads the resident set size (RSS) of the
dispatcher, of every agent process and of each agent's children once a second.

Figures: the dispatcher's RSS idle, with every task queued, and its peak; per agent process
the peak RSS (median and max over the agents) and its children's; times to submit, to queue
(outbox empty), and to run everything, and the tasks/s of that run.
"""

from __future__ import annotations

import sqlite3
import statistics
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pika
import pika.exceptions
import psutil

from bench.procs import ManagedProcess, wait_until
from rexec.schemas import names
from rexec.schemas.api import SubmitTask, TaskState

if TYPE_CHECKING:
    from bench.systems.rexec_system import RexecSystem
    from bench.workloads import Sizes

MIB = 2**20
SUBMIT_CHUNK = 1000


class RssSampler:
    """Peak RSS per watched process (and of its descendants), sampled in a thread."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._watched: dict[str, ManagedProcess] = {}
        self.peak: dict[str, int] = {}
        self.children_peak: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, proc: ManagedProcess) -> None:
        with self._lock:
            self._watched[name] = proc

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            watched = list(self._watched.items())
        for name, proc in watched:
            try:
                root = psutil.Process(proc.pid)
                own = root.memory_info().rss
                children = 0
                for child in root.children(recursive=True):
                    try:
                        children += child.memory_info().rss
                    except psutil.NoSuchProcess:
                        continue
            except psutil.NoSuchProcess:
                continue
            self.peak[name] = max(self.peak.get(name, 0), own)
            self.children_peak[name] = max(self.children_peak.get(name, 0), children)

    def rss_now(self, name: str) -> int:
        return int(psutil.Process(self._watched[name].pid).memory_info().rss)


def outbox_rows(db: Path) -> int:
    """Attempts committed but not yet confirmed by the broker (read-only look at SQLite)."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(connection.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        connection.close()


def queued_messages(amqp_url: str, queues: list[str]) -> int:
    """Ready messages over ``queues`` (passive declares: exact, unlike the management stats)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        return sum(int(channel.queue_declare(q, passive=True).method.message_count) for q in queues)
    finally:
        if connection.is_open:
            connection.close()


def scale(system: RexecSystem, sizes: Sizes) -> dict[str, object]:
    client = system.client
    dispatcher = system.start_dispatcher()
    pools = [f"scale-{i:02d}" for i in range(sizes.scale_pools)]
    for pool in pools:
        client.create_pool(pool)
    sampler = RssSampler()
    sampler.watch("dispatcher", dispatcher)
    sampler.start()
    try:
        time.sleep(1.0)  # let start-up settle before the idle figure
        idle = sampler.rss_now("dispatcher")
        tasks = [
            SubmitTask(pool=pools[i % len(pools)], target="bench.tasks:noop")
            for i in range(sizes.scale_tasks)
        ]
        t0 = time.time()
        ids: list[str] = []
        for start in range(0, len(tasks), SUBMIT_CHUNK):
            ids.extend(client.submit_many(tasks[start : start + SUBMIT_CHUNK]))
        submitted = time.time()
        db = system.ctx.log_dir / "rexec.db"
        wait_until(lambda: outbox_rows(db) == 0, sizes.scale_timeout, 0.5, "the outbox to drain")
        queued_at = time.time()
        in_queues = queued_messages(system.ctx.amqp_url, [names.pool_queue(p) for p in pools])
        queued_rss = sampler.rss_now("dispatcher")
        agent_pools = [pools[i % len(pools)] for i in range(sizes.scale_agents)]
        agents_from = time.time()
        agents = system.start_agents(agent_pools, sizes.scale_concurrency, timeout=300)
        online_at = time.time()
        for i, agent in enumerate(agents):
            sampler.watch(f"agent-{i}", agent)
        remaining = sizes.scale_timeout - (time.time() - t0)
        views = client.wait(ids, timeout=max(1.0, remaining))
        done_at = time.time()
    finally:
        sampler.stop()
    succeeded = sum(1 for v in views if v.state is TaskState.SUCCEEDED)
    agent_peaks = [v for k, v in sampler.peak.items() if k.startswith("agent-")]
    child_peaks = [v for k, v in sampler.children_peak.items() if k.startswith("agent-")]
    complete = succeeded == len(ids)
    run_s = done_at - agents_from
    return {
        "tasks": sizes.scale_tasks,
        "pools": sizes.scale_pools,
        "agents": sizes.scale_agents,
        "agent_processes": len(agents),
        "concurrency": sizes.scale_concurrency,
        "completed": succeeded,
        "failed": sum(1 for v in views if v.state.terminal and v.state is not TaskState.SUCCEEDED),
        "queued_in_rabbitmq": in_queues,
        "submit_s": round(submitted - t0, 2),
        "queue_s": round(queued_at - t0, 2),
        "agents_online_s": round(online_at - agents_from, 2),
        "run_s": round(run_s, 2),
        "tasks_per_s": round(len(ids) / run_s, 1) if complete else None,
        "dispatcher_idle_mib": _mib(idle),
        "dispatcher_queued_mib": _mib(queued_rss),
        "dispatcher_peak_mib": _mib(sampler.peak.get("dispatcher")),
        "agent_median_mib": _mib(statistics.median(agent_peaks) if agent_peaks else None),
        "agent_max_mib": _mib(max(agent_peaks, default=None)),
        "agent_children_median_mib": _mib(statistics.median(child_peaks) if child_peaks else None),
    }


def _mib(value: float | None) -> float | None:
    return None if value is None else round(value / MIB, 1)
