"""The four Airflow executors under test, each with its Airflow and its workers.

Reuses the test harness (importing from ``tests.airflow`` and ``tests.support`` on purpose:
one way to start Airflow and a rexec plane, not two): :class:`AirflowInstance` starts Airflow
from ``$REXEC_AIRFLOW_VENV`` (the bench venv, which has the Edge and Celery providers beside
rexec), :class:`RexecStack` starts a rexec plane on its own vhost and Redis prefix. Celery gets a
vhost and a Redis key prefix of its own from :func:`bench.infra.isolated_run`.

Every system gets the same budget: Airflow's ``[core] parallelism`` 8, and two workers of
concurrency 4 (Local: its 8 worker processes). Failure detection keeps each system's defaults;
:meth:`System.settings` records them.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar

import psutil

import tests.airflow.rexec_stack as rexec_stack
from bench.infra import RunContext, isolated_run, wait_for_consumers
from rexec.schemas.settings import load_settings
from tests.airflow.harness import AirflowInstance
from tests.support import Process, free_port

WORKERS = 2
CONCURRENCY = 4
PARALLELISM = WORKERS * CONCURRENCY
TASK_INSTANCE_HEARTBEAT_TIMEOUT = 300
"""Airflow's default ``[scheduler] task_instance_heartbeat_timeout``: how long a running try may
go without a heartbeat before the scheduler fails it (and retries it). The harness sets it
explicitly; it is the default value."""
WORKER_START_TIMEOUT = 180.0

COMMON_ENV = {"AIRFLOW__CORE__PARALLELISM": str(PARALLELISM)}
"""Every system's Airflow: no more tries in flight than there are worker slots, so a try's
queued-to-running time is dispatch, not waiting for a slot."""


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and every descendant, parents first."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def signal_tree(pid: int, sig: signal.Signals) -> int:
    """Send ``sig`` to the worker and everything it started (a node crash or a frozen VM);
    how many processes got it."""
    procs = process_tree(pid)
    if sig == signal.SIGCONT:
        procs.reverse()
    sent = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
            sent += 1
    return sent


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll ``predicate`` every ``interval`` until it is truthy; an error after ``timeout``.

    Polls less often than ``tests.support.wait_until`` (20 ms): on two cores a tight loop of
    REST calls would slow down the Airflow it measures."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class System:
    """One executor: its Airflow (``self.airflow``) and its named workers."""

    name: ClassVar[str]
    executor: ClassVar[str]
    remote: ClassVar[bool] = True

    def __init__(self, home: Path, dags: Path) -> None:
        self.home = home
        self.dags = dags
        self.exits = ExitStack()
        self.airflow: AirflowInstance | None = None
        self.workers: dict[str, Process] = {}

    def airflow_env(self) -> dict[str, str]:
        return dict(COMMON_ENV)

    def start(self) -> AirflowInstance:
        """Airflow with this executor, and two workers (``w1``, ``w2``)."""
        self.airflow = AirflowInstance(
            self.home / "airflow", self.dags, self.executor, self.airflow_env()
        )
        self.exits.callback(self.airflow.stop)
        self.prepare(self.airflow)
        self.airflow.start()
        if self.remote:
            for index in range(1, WORKERS + 1):
                self.start_worker(f"w{index}")
        return self.airflow

    def prepare(self, airflow: AirflowInstance) -> None:
        """Settings that need the instance's ports, before it starts."""

    def start_worker(self, name: str) -> Process:
        raise NotImplementedError

    def worker_pid(self, name: str) -> int:
        return self.workers[name].pid

    def stop_worker(self, name: str) -> None:
        """Stop a worker and everything it started (also after SIGSTOP or kill -9)."""
        process = self.workers.pop(name)
        survivors = process_tree(process.pid)
        signal_tree(process.pid, signal.SIGCONT)
        process.stop(timeout=10.0)
        for proc in survivors:  # children that left the process group
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()

    def settings(self) -> dict[str, object]:
        return {
            "parallelism": PARALLELISM,
            "workers": WORKERS if self.remote else 0,
            "concurrency": CONCURRENCY if self.remote else None,
            "task_instance_heartbeat_timeout": TASK_INSTANCE_HEARTBEAT_TIMEOUT,
            "scheduler_heartbeat_sec": 2,
        }

    def fanout_detail(self, dag_id: str, run_id: str) -> dict[str, object]:
        """What the system itself saw of a run's tries (for where the time goes)."""
        return {}

    def worker_env(self, name: str) -> dict[str, str]:
        """A Celery or Edge worker: Airflow's settings (on this machine they share the metadata
        database's file, as workers of those executors may), a home and log-server port of its
        own, and the name the bench DAG records."""
        assert self.airflow is not None
        home = self.home / "workers" / name
        home.mkdir(parents=True, exist_ok=True)
        return {
            **self.airflow.env,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "BENCH_WORKER": name,
        }

    def close(self) -> None:
        for name in list(self.workers):
            self.stop_worker(name)
        self.exits.close()


class LocalSystem(System):
    """The floor: the scheduler's own LocalExecutor, ``parallelism`` worker processes."""

    name = "local"
    executor = "LocalExecutor"
    remote = False


class RexecSystem(System):
    """``RexecExecutor`` with two rexec agents of concurrency 4 (the agents in the bench venv).

    The plane keeps rexec's default heartbeat TTL and watchdog interval: :class:`RexecStack`
    uses 3 s for the tests, so its module constant is set to the default before it starts.
    """

    name = "rexec"
    executor = rexec_stack.EXECUTOR

    def __init__(self, home: Path, dags: Path) -> None:
        super().__init__(home, dags)
        defaults = load_settings({})
        self.ttl = defaults.heartbeat_ttl
        self.watchdog_interval = defaults.watchdog_interval
        rexec_stack.HEARTBEAT_TTL = self.ttl
        (home / "rexec").mkdir(parents=True, exist_ok=True)
        self.stack = rexec_stack.RexecStack(home / "rexec", {"default": rexec_stack.POOL})
        self.exits.callback(self.stack.close)

    def airflow_env(self) -> dict[str, str]:
        return {**super().airflow_env(), **self.stack.airflow_env()}

    def prepare(self, airflow: AirflowInstance) -> None:
        self.stack.airflow = airflow

    def start_worker(self, name: str) -> Process:
        process = self.stack.start_agent(name, env={"BENCH_WORKER": name}, concurrency=CONCURRENCY)
        self.workers[name] = process
        return process

    def stop_worker(self, name: str) -> None:
        super().stop_worker(name)
        self.stack.agents.pop(name, None)

    def fanout_detail(self, dag_id: str, run_id: str) -> dict[str, object]:
        """rexec's own view of the run's tries: submit to agent start, and agent start to the
        end of the attempt (the child's supervisor and task, plus reporting), to set beside
        Airflow's start-to-end of the same tries. Read from the plane's SQLite file (read-only):
        the API leaves a sensitive task's workload out of listings."""
        query = (
            "SELECT count(*), avg(started_at - created_at), avg(finished_at - started_at)"
            " FROM tasks WHERE json_extract(kwargs_json, '$.workload.ti.dag_id') = ?"
            " AND json_extract(kwargs_json, '$.workload.ti.run_id') = ?"
            " AND finished_at IS NOT NULL"
        )
        path = self.stack.home / "rexec.db"
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            count, to_start, attempt = db.execute(query, (dag_id, run_id)).fetchone()
        if not count:
            return {}
        return {
            "rexec_tasks": count,
            "rexec_submit_to_start_mean_s": round(to_start, 3),
            "rexec_attempt_mean_s": round(attempt, 3),
        }

    def settings(self) -> dict[str, object]:
        return {
            **super().settings(),
            "rexec_heartbeat_ttl": self.ttl,
            "rexec_watchdog_interval": self.watchdog_interval,
            "rexec_feed_wait": 5,
            "database": "sqlite",
        }


class CeleryExecutorSystem(System):
    """``CeleryExecutor`` (apache-airflow-providers-celery): RabbitMQ broker on a vhost of its
    own, Redis result backend under a key prefix of its own, two ``airflow celery worker`` of
    concurrency 4 (prefork pool; the provider's defaults: acks_late, prefetch multiplier 1)."""

    name = "celery"
    executor = "CeleryExecutor"

    def __init__(self, home: Path, dags: Path) -> None:
        super().__init__(home, dags)
        self.ctx: RunContext = self.exits.enter_context(isolated_run("airflow-celery"))

    def airflow_env(self) -> dict[str, str]:
        return {
            **super().airflow_env(),
            "AIRFLOW__CELERY__BROKER_URL": self.ctx.amqp_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": self.ctx.redis_url,
            "AIRFLOW__CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": (
                f"{self.ctx.prefix}:"
            ),
        }

    def start_worker(self, name: str) -> Process:
        assert self.airflow is not None
        before = len(self.workers)
        argv = [self.airflow.airflow, "celery", "worker", "--concurrency", str(CONCURRENCY)]
        argv += ["--celery-hostname", f"{name}@bench"]
        process = Process(
            argv, self.worker_env(name), self.home / f"worker-{name}.log", cwd=self.home
        )
        self.workers[name] = process
        wait_for_consumers(self.ctx.amqp_url, "default", before + 1, WORKER_START_TIMEOUT)
        return process

    def settings(self) -> dict[str, object]:
        return {
            **super().settings(),
            "celery_pool": "prefork",
            "task_acks_late": True,
            "worker_prefetch_multiplier": 1,
            "broker": "RabbitMQ (amqp, own vhost)",
            "result_backend": "Redis (own key prefix)",
        }


class EdgeSystem(System):
    """``EdgeExecutor`` (apache-airflow-providers-edge3 5.1.0): the API server serves the
    Edge API, two ``airflow edge worker`` of concurrency 4 poll it over HTTP."""

    name = "edge"
    executor = "airflow.providers.edge3.executors.EdgeExecutor"

    def airflow_env(self) -> dict[str, str]:
        return {**super().airflow_env(), "AIRFLOW__EDGE__API_ENABLED": "True"}

    def prepare(self, airflow: AirflowInstance) -> None:
        airflow.env["AIRFLOW__EDGE__API_URL"] = f"{airflow.base_url}/edge_worker/v1/rpcapi"

    def start_worker(self, name: str) -> Process:
        assert self.airflow is not None
        argv = [self.airflow.airflow, "edge", "worker", "--concurrency", str(CONCURRENCY)]
        argv += ["--edge-hostname", name]
        process = Process(
            argv, self.worker_env(name), self.home / f"worker-{name}.log", cwd=self.home
        )
        self.workers[name] = process
        wait_for(
            lambda: self._worker_state(name) in {"idle", "running"} or process.popen.poll(),
            WORKER_START_TIMEOUT,
            f"edge worker {name} registered",
            interval=0.5,
        )
        if process.popen.poll() is not None:
            raise RuntimeError(f"edge worker {name} exited:\n{process.output()[-4000:]}")
        return process

    def _worker_state(self, name: str) -> str | None:
        """The worker's state in Edge's table (read-only, straight from the SQLite file)."""
        assert self.airflow is not None
        path = self.airflow.home / "airflow.db"
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                row = db.execute(
                    "SELECT state FROM edge_worker WHERE worker_name = ?", (name,)
                ).fetchone()
        except sqlite3.Error:
            return None
        return str(row[0]).lower() if row else None

    def settings(self) -> dict[str, object]:
        return {
            **super().settings(),
            "edge_heartbeat_interval": 30,
            "edge_job_poll_interval": 5,
            "edge_worker_lost_after": "5 x heartbeat_interval = 150 s",
        }


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls for cls in (LocalSystem, RexecSystem, CeleryExecutorSystem, EdgeSystem)
}
