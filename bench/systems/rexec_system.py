"""rexec in the benchmark: ``rexec serve`` plus one ``rexec-agent`` per worker process.

The dispatcher is rexec's orchestration plane (what RabbitMQ and Redis are to the peers): it
runs beside the workers and is not counted in the two-worker budget. Unpaced batches are
submitted through the batch endpoint (``submit_many``); paced ones one request per task, each
sent at its due time from a pool of threads, so a slow answer does not hold back the next
submission (an open loop, as the peers' publishes are: a closed loop would lower the rate
whenever the API is slow, and hide that slowness from the latency figures).
Results are known through the batch long-poll (``wait``); a task's done time is when the
dispatcher recorded its result (``finished_at``, same clock), and the last one is when the
submitter's wait returned, so "until the submitter knows every result" is honest.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import anyio
import asyncpg
import httpx

from bench.infra import RunContext
from bench.procs import ManagedProcess, start_module, wait_until
from bench.systems.base import BatchResult, System, TaskSpec, schedule
from rexec.client import RexecClient
from rexec.schemas.api import SubmitTask, TaskState, TaskView

POOL = "bench"
DATABASE = os.environ.get("BENCH_REXEC_DATABASE", "sqlite")
"""``sqlite`` (the default, a file of the run's) or ``postgres`` (a database of the run's on
``BENCH_POSTGRES_DSN``, dropped afterwards): production's metadata database."""
POSTGRES_DSN = os.environ.get("BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432")
API_PORT = int(os.environ.get("BENCH_REXEC_API_PORT", "8695"))
HEARTBEAT_TTL = float(os.environ.get("BENCH_REXEC_HEARTBEAT_TTL", "3"))
WATCHDOG_INTERVAL = float(os.environ.get("BENCH_REXEC_WATCHDOG_INTERVAL", "0.5"))
THROUGHPUT_CONCURRENCY = int(os.environ.get("BENCH_REXEC_CONCURRENCY", "16"))
SUBMIT_CHUNK = 1000
PACED_SUBMITTERS = 32
"""Threads of the one submitting process that send paced submissions (requests in flight)."""


class RexecSystem(System):
    name = "rexec"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self._database: str | None = None
        self._task_logs = ctx.log_dir / "task-logs"
        """The agents' attempt logs: the run's own, removed when it ends (tens of thousands of
        files a run; the workers' own logs stay for post-mortems)."""
        self.api_url = f"http://127.0.0.1:{API_PORT}"
        management = ctx.management_url.replace(
            "://", f"://{ctx.management_auth[0]}:{ctx.management_auth[1]}@", 1
        )
        self.env = {
            "REXEC_DATABASE_URL": self._database_url(),
            "REXEC_AMQP_URL": ctx.amqp_url,
            "REXEC_MANAGEMENT_URL": management,
            "REXEC_REDIS_URL": ctx.redis_url,
            "REXEC_REDIS_PREFIX": ctx.prefix,
            "REXEC_API_PORT": str(API_PORT),
            "REXEC_API_URL": self.api_url,
            # The dispatcher's bootstrap admin key (every API call needs a key).
            "REXEC_API_KEY": "rexec_bench_" + secrets.token_urlsafe(24),
            "REXEC_HEARTBEAT_TTL": str(HEARTBEAT_TTL),
            "REXEC_WATCHDOG_INTERVAL": str(WATCHDOG_INTERVAL),
            # The run's own task logs: a shared directory would grow run after run, and
            # every agent's start-up sweep of old logs would walk all of it.
            "REXEC_LOG_DIR": str(self._task_logs),
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        }
        self.dispatcher: ManagedProcess | None = None
        self.agents: list[ManagedProcess] = []
        self.client = RexecClient(self.api_url, api_key=self.env["REXEC_API_KEY"], timeout=120)
        self._settings: dict[str, object] = {}

    def _database_url(self) -> str:
        if DATABASE == "sqlite":
            return f"sqlite+aiosqlite:///{self.ctx.log_dir / 'rexec.db'}"
        if DATABASE != "postgres":
            raise ValueError(f"BENCH_REXEC_DATABASE must be sqlite or postgres, not {DATABASE!r}")
        self._database = "bench_" + self.ctx.run_id.replace("-", "_")
        anyio.run(_postgres_admin, f'CREATE DATABASE "{self._database}"')
        return f"postgresql+asyncpg://{POSTGRES_DSN.split('://', 1)[1]}/{self._database}"

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {"rexec": version("rexec"), "aio-pika": version("aio-pika")}

    def settings(self) -> dict[str, object]:
        return self._settings

    def start_workers(self, n_processes: int, concurrency: int | None) -> None:
        slots = THROUGHPUT_CONCURRENCY if concurrency is None else concurrency
        self._settings = {
            "agents": n_processes,
            "concurrency": slots,
            "heartbeat_ttl": HEARTBEAT_TTL,
            "watchdog_interval": WATCHDOG_INTERVAL,
            "database": DATABASE,
        }
        self.start_dispatcher()
        self.client.create_pool(POOL)
        self.start_agents([POOL] * n_processes, slots)

    def start_dispatcher(self) -> ManagedProcess:
        self.dispatcher = start_module(
            "rexec-dispatcher",
            "rexec.client.cli",
            ["serve"],
            self.env,
            self.ctx.log_dir / "rexec-dispatcher.log",
        )
        wait_until(self._api_answers, 30, what="rexec serve")
        return self.dispatcher

    def start_agents(
        self, pools: Sequence[str], concurrency: int, timeout: float = 60.0
    ) -> list[ManagedProcess]:
        """One ``rexec-agent`` process per entry of ``pools`` (agent i serves ``pools[i]``)."""
        started: list[ManagedProcess] = []
        for pool in pools:
            i = len(self.agents)
            token = self.client.create_token(pool, name=f"bench-{i}").secret
            argv = ["--pool", pool, "--concurrency", str(concurrency), "--allow", "bench.tasks:*"]
            env = {**self.env, **self.ctx.worker_env(i), "REXEC_AGENT_TOKEN": token}
            agent = start_module(
                f"rexec-agent-{i}",
                "rexec.worker.cli",
                argv,
                env,
                self.ctx.log_dir / f"rexec-agent-{i}.log",
            )
            self.agents.append(agent)
            started.append(agent)
        wait_until(
            lambda: self._online(None) >= len(self.agents),
            timeout,
            interval=0.25,
            what=f"{len(self.agents)} rexec agents online",
        )
        return started

    def _api_answers(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _online(self, pool: str | None = POOL) -> int:
        return sum(agent.state == "online" for agent in self.client.list_agents(pool=pool))

    def worker_processes(self) -> list[ManagedProcess]:
        return list(self.agents)

    def stop_workers(self) -> None:
        for proc in [*self.agents, *([self.dispatcher] if self.dispatcher else [])]:
            proc.stop()
        self.agents.clear()
        self.dispatcher = None

    def close(self) -> None:
        self.client.close()
        shutil.rmtree(self._task_logs, ignore_errors=True)
        if self._database is not None:
            anyio.run(_postgres_admin, f'DROP DATABASE IF EXISTS "{self._database}" WITH (FORCE)')
            self._database = None

    def _task(self, spec: TaskSpec) -> SubmitTask:
        if spec.kind == "noop":
            return SubmitTask(pool=POOL, target="bench.tasks:noop")
        if spec.kind == "stamp":
            return SubmitTask(
                pool=POOL, target="bench.tasks:stamp", args=[spec.bench_id, self.ctx.sink]
            )
        return SubmitTask(
            pool=POOL,
            target="bench.tasks:sleep_record",
            args=[spec.bench_id, spec.seconds, self.ctx.sink],
        )

    def run_batch(
        self, tasks: Sequence[TaskSpec], rate: float | None, timeout: float
    ) -> BatchResult:
        result = BatchResult()
        ids: dict[str, str] = {}  # rexec id -> bench id
        t0 = time.time()
        deadline = t0 + timeout
        if rate is None:
            for start in range(0, len(tasks), SUBMIT_CHUNK):
                chunk = tasks[start : start + SUBMIT_CHUNK]
                at = time.time()
                for spec, task_id in zip(
                    chunk, self.client.submit_many([self._task(s) for s in chunk]), strict=True
                ):
                    ids[task_id] = spec.bench_id
                    result.submitted[spec.bench_id] = at
        else:
            sent: list[tuple[TaskSpec, Future[str]]] = []
            with ThreadPoolExecutor(PACED_SUBMITTERS, thread_name_prefix="submit") as submitters:
                for index, spec in enumerate(tasks):
                    delay = schedule(index, rate, t0) - time.time()
                    if delay > 0:
                        time.sleep(delay)
                    result.submitted[spec.bench_id] = time.time()
                    sent.append((spec, submitters.submit(self._submit_one, spec)))
            for spec, submitted in sent:
                ids[submitted.result()] = spec.bench_id
        views = self.client.wait(list(ids), timeout=max(0.0, deadline - time.time()))
        known = time.time()
        self._record(views, ids, result, known)
        return result

    def _submit_one(self, spec: TaskSpec) -> str:
        task = self._task(spec)
        return self.client.submit(POOL, task.target, args=task.args).id

    @staticmethod
    def _record(
        views: list[TaskView], ids: dict[str, str], result: BatchResult, known: float
    ) -> None:
        finished = [v for v in views if v.state.terminal]
        last = max(finished, key=lambda v: v.finished_at or 0.0, default=None)
        for view in finished:
            bench_id = ids[view.id]
            if view.state is TaskState.SUCCEEDED:
                result.done[bench_id] = known if view is last else (view.finished_at or known)
            else:
                result.failed[bench_id] = f"{view.state.value}: {view.error}"


async def _postgres_admin(statement: str) -> None:
    connection = await asyncpg.connect(f"{POSTGRES_DSN}/postgres")
    try:
        await connection.execute(statement)
    finally:
        await connection.close()
