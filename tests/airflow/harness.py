"""A real Apache Airflow 3 for tests: its processes started from ``$REXEC_AIRFLOW_VENV``.

The tests run in rexec's own venv and never import Airflow: :class:`AirflowInstance` runs
``airflow db migrate``, then ``airflow api-server``, ``airflow scheduler`` and
``airflow dag-processor`` from the Airflow venv (``make airflow-venv``) as three processes, and
talks to them over the REST API (``/api/v2``). The metadata database is a SQLite file in the
instance's home: Airflow 3 accepts it beside a real scheduler and the LocalExecutor (or any other
executor), and the tests keep it to one writer's load.

Everything it writes (``AIRFLOW_HOME``, the database, the task logs, the processes' own logs)
lives under ``home``; nothing goes into the repository.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from tests.support import REPO, Process, free_port, http_ready, wait_until

AIRFLOW_VENV_VAR = "REXEC_AIRFLOW_VENV"
AGENT_ENV_VAR = "REXEC_TEST_AIRFLOW_AGENT_ENV"
"""Where the scheduler's environment carries :meth:`AirflowInstance.agent_env` (for
``tests/airflow/agent_env_executor.py``)."""
AGENT_ENV_EXECUTOR = "agent_env:tests.airflow.agent_env_executor.AgentEnvExecutor"
"""An executor (alias ``agent_env``) that runs tasks with nothing but :meth:`agent_env`: add it to
``executor`` (``"LocalExecutor," + AGENT_ENV_EXECUTOR``) and give tasks ``executor="agent_env"``."""

START_TIMEOUT = 240.0
"""Migrating the database and starting three Airflow processes: about 45 s on an idle 2-core
machine, several times that while the rest of the test suite runs beside it."""
RUN_TIMEOUT = 180.0
"""A DAG run of a few small tasks: each task costs a process start and the scheduler's loop."""

NO_DATABASE = "sqlite:////nonexistent/no-metadata-database-for-workers/airflow.db"
"""The metadata database URL :meth:`AirflowInstance.agent_env` gives workers: one that fails."""

FINISHED = frozenset({"success", "failed"})
DATABASE_ERROR = '"reason":"Database error"'
DATABASE_BUSY_FOR = 60.0
"""Seconds a REST call is sent again while Airflow's SQLite database is locked."""


def airflow_venv() -> Path:
    """The venv ``make airflow-venv`` builds: ``$REXEC_AIRFLOW_VENV`` (``make pytest`` exports
    it), else the checkout's ``.venv-airflow``. An error, never a skip, where it is not built."""
    value = os.environ.get(AIRFLOW_VENV_VAR, "")
    venv = Path(value) if value else REPO / ".venv-airflow"
    if not (venv / "bin" / "airflow").is_file():
        where = (
            f"{AIRFLOW_VENV_VAR}={value}" if value else f"{AIRFLOW_VENV_VAR} is unset and {venv}"
        )
        raise RuntimeError(
            f"no Airflow: {where} holds no bin/airflow. Run `make airflow-venv` (it builds "
            f"{REPO / '.venv-airflow'}; `make pytest` builds it and sets {AIRFLOW_VENV_VAR})"
        )
    return venv


def _quote(value: str) -> str:
    return quote(value, safe="")


class AirflowError(AssertionError):
    """Airflow did something a test did not expect; the message carries its processes' logs."""


class AirflowInstance:
    """One Airflow: metadata database, API server, scheduler and DAG processor.

    ``executor`` is Airflow's ``[core] executor`` (``LocalExecutor``, or a class path such as
    ``rexec.airflow.executor.RexecExecutor``; several, comma-separated, are allowed). ``env`` is
    added to every Airflow process's environment (``AIRFLOW__REXEC__API_URL`` and the like) and
    wins over the harness's own settings.
    """

    def __init__(
        self,
        home: Path,
        dags: Path,
        executor: str = "LocalExecutor",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.venv = airflow_venv()
        self.airflow = str(self.venv / "bin" / "airflow")
        self.python = str(self.venv / "bin" / "python")
        self.home = home
        self.dags = dags
        self.executor = executor
        self.logs = home / "process-logs"
        self.task_logs = home / "logs"
        self.api_port = free_port()
        self.log_server_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.execution_api_url = f"{self.base_url}/execution/"
        home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.task_logs.mkdir(exist_ok=True)
        self.env: dict[str, str] = {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": self.execution_api_url,
            # Every request is an admin's: no user, password or token to handle.
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API__WORKERS": "1",
            # The three processes sign and check the Execution API's tokens with one secret.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.task_logs),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.log_server_port),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # New DAG files are noticed in seconds, not the default five minutes.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            # A loaded test machine is slow, not broken: no zombie hunting for tasks mid-start.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "300",
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
            "AIRFLOW__CORE__DAG_FILE_PROCESSOR_TIMEOUT": "180",
            "PYTHONUNBUFFERED": "1",
            "NO_COLOR": "1",
            **(env or {}),
        }
        # The repository on every process's path (rexec.airflow, tests.airflow's executor),
        # before whatever ``env`` or this process adds.
        extra = (env or {}).get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *(p for p in extra.split(os.pathsep) if p and p != str(REPO))]
        )
        self.env[AGENT_ENV_VAR] = json.dumps(self.agent_env())
        self.api_server: Process | None = None
        self.scheduler: Process | None = None
        self.dag_processor: Process | None = None
        self._restarts = 0
        self.client = httpx.Client(base_url=f"{self.base_url}/api/v2", timeout=60.0)
        self.started_in: float | None = None
        """Seconds :meth:`start` took, for the tests' reports."""

    # Lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        began = time.monotonic()
        deadline = began + timeout
        self._run_cli(["db", "migrate"], log="db-migrate.log", timeout=timeout)
        self.api_server = self._spawn("api-server")
        self.dag_processor = self._spawn("dag-processor")
        self.scheduler = self._spawn("scheduler")
        self._wait_healthy(deadline - time.monotonic())
        self.started_in = time.monotonic() - began

    def stop(self) -> None:
        """Stop every process and its children (each runs in its own process group)."""
        for name in ("scheduler", "dag_processor", "api_server"):
            process: Process | None = getattr(self, name)
            if process is not None:
                process.stop(timeout=20.0)
        self.client.close()

    def __enter__(self) -> AirflowInstance:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop_scheduler(self) -> None:
        """Stop the scheduler (SIGTERM: it stops its executor first), e.g. for a restart test."""
        assert self.scheduler is not None, "the scheduler is not running"
        self.scheduler.stop(timeout=60.0)
        self.scheduler = None

    def start_scheduler(self, timeout: float = START_TIMEOUT) -> None:
        """Start the scheduler again and wait until the API server sees its heartbeat."""
        assert self.scheduler is None, "the scheduler is already running"
        self._restarts += 1
        started = time.time()
        self.scheduler = self._spawn("scheduler", log=f"scheduler.{self._restarts}.log")
        self._wait_healthy(timeout, scheduler_since=started)

    def _spawn(self, command: str, log: str | None = None) -> Process:
        return Process(
            [self.airflow, command],
            self.env,
            self.logs / (log or f"{command}.log"),
            cwd=self.home,
        )

    def _run_cli(self, args: list[str], log: str, timeout: float) -> None:
        path = self.logs / log
        with path.open("wb") as out:
            result = subprocess.run(
                [self.airflow, *args],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                timeout=timeout,
                check=False,
            )
        if result.returncode != 0:
            raise AirflowError(
                f"`airflow {' '.join(args)}` exited {result.returncode}:\n"
                + path.read_text(errors="replace")[-8000:]
            )

    def _processes(self) -> dict[str, Process]:
        named = {
            "api-server": self.api_server,
            "scheduler": self.scheduler,
            "dag-processor": self.dag_processor,
        }
        return {name: p for name, p in named.items() if p is not None}

    def _check_alive(self) -> None:
        for name, process in self._processes().items():
            code = process.popen.poll()
            if code is not None:
                raise AirflowError(f"airflow {name} exited {code}:\n{process.output()[-8000:]}")

    def diagnostics(self, tail: int = 4000) -> str:
        """The end of every Airflow process's log, for a failing test's message."""
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name} (last {tail} chars) ---\n{text[-tail:]}")
        return "\n".join(parts)

    def health(self) -> dict[str, Any]:
        response = self.client.get("/monitor/health")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def _wait_healthy(self, timeout: float, scheduler_since: float | None = None) -> None:
        """Until the API server answers and reports a live scheduler and DAG processor (the
        scheduler's heartbeat newer than ``scheduler_since`` after a restart)."""

        def healthy() -> bool:
            self._check_alive()
            if not http_ready(f"{self.base_url}/api/v2/monitor/health"):
                return False
            status = self.health()
            scheduler = status.get("scheduler", {})
            processor = status.get("dag_processor", {})
            if scheduler.get("status") != "healthy" or processor.get("status") != "healthy":
                return False
            if scheduler_since is not None:
                beat = scheduler.get("latest_scheduler_heartbeat") or ""
                return bool(beat) and _timestamp(beat) > scheduler_since
            return True

        self._wait(healthy, timeout, "Airflow's API server, scheduler and DAG processor")

    def _wait(self, predicate: Any, timeout: float, what: str) -> Any:
        try:
            return wait_until(predicate, timeout=timeout, what=what)
        except AirflowError:
            raise
        except AssertionError as exc:
            raise AirflowError(f"{exc}\n{self.diagnostics()}") from None

    # The worker's side -------------------------------------------------------------------------

    def agent_env(self) -> dict[str, str]:
        """What an Airflow worker (a rexec agent running ``python -m
        airflow.sdk.execution_time.execute_workload``) needs to run this instance's tasks.

        The task SDK talks only to the Execution API, never to the metadata database: the
        database URL given here leads nowhere, so a task that tried would fail. The task logs go
        to the same folder as the instance's (this machine), where the API server reads them.
        """
        keys = (
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
            "AIRFLOW__CORE__DAGS_FOLDER",
            # The worker parses the DAG file, and rejects a task whose executor is not in it.
            "AIRFLOW__CORE__EXECUTOR",
            "AIRFLOW__CORE__LOAD_EXAMPLES",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER",
            "AIRFLOW__LOGGING__LOGGING_LEVEL",
            "PYTHONPATH",
            "PYTHONUNBUFFERED",
        )
        worker_home = self.home / "worker-home"
        worker_home.mkdir(exist_ok=True)
        return {
            **{key: self.env[key] for key in keys},
            "AIRFLOW_HOME": str(worker_home),
            # ``import airflow`` makes an engine but never connects: a file that cannot be opened.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": NO_DATABASE,
        }

    # REST API ----------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        def answered() -> httpx.Response | None:
            response = self.client.request(method, path, **kwargs)
            # SQLite locked by the scheduler for longer than its busy timeout (a loaded
            # machine): Airflow answers 500 "Database error"; the same request later succeeds.
            if response.status_code == 500 and DATABASE_ERROR in response.text:
                return None
            return response

        response: httpx.Response = wait_until(
            answered, DATABASE_BUSY_FOR, f"{method} /api/v2{path} past a locked SQLite"
        )
        if response.is_error:
            raise AirflowError(
                f"{method} /api/v2{path}: {response.status_code} {response.text[:2000]}"
            )
        return response.json() if response.content else None

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        response = self.client.get(f"/dags/{_quote(dag_id)}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def import_errors(self) -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = self._request("GET", "/importErrors")["import_errors"]
        return errors

    def wait_dag_parsed(self, dag_id: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        """Until the DAG processor has parsed ``dag_id``; fails early on an import error of a
        file named after it (``<dag_id>.py``), and lists every import error on a timeout."""

        def parsed() -> dict[str, Any] | None:
            self._check_alive()
            found = self.dag(dag_id)
            if found is not None:
                return found
            for error in self.import_errors():
                if Path(error.get("filename") or "").stem == dag_id:
                    raise AirflowError(f"DAG file of {dag_id} does not import: {error}")
            return None

        try:
            result = wait_until(parsed, timeout, f"DAG {dag_id} to be parsed")
        except AirflowError:
            raise
        except AssertionError as exc:
            errors = self.import_errors()
            raise AirflowError(f"{exc}; import errors: {errors}\n{self.diagnostics()}") from None
        assert result is not None
        return result

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None) -> str:
        """Start a run of ``dag_id`` now; its run id."""
        body = {"logical_date": None, "conf": dict(conf or {})}
        run = self._request("POST", f"/dags/{_quote(dag_id)}/dagRuns", json=body)
        run_id: str = run["dag_run_id"]
        return run_id

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self._request(
            "GET", f"/dags/{_quote(dag_id)}/dagRuns/{_quote(run_id)}"
        )
        return run

    def wait_run(
        self,
        dag_id: str,
        run_id: str,
        states: Collection[str] = FINISHED,
        timeout: float = RUN_TIMEOUT,
    ) -> dict[str, Any]:
        """Until the run's state is one of ``states``; the run."""

        def reached() -> dict[str, Any] | None:
            self._check_alive()
            run = self.dag_run(dag_id, run_id)
            return run if run["state"] in states else None

        try:
            result = wait_until(
                reached, timeout=timeout, what=f"run {dag_id}/{run_id} in {sorted(states)}"
            )
        except AirflowError:
            raise
        except AssertionError as exc:
            tis = self.task_instances(dag_id, run_id)
            summary = [(ti["task_id"], ti["state"], ti["try_number"]) for ti in tis]
            raise AirflowError(f"{exc}; tasks: {summary}\n{self.diagnostics()}") from None
        assert result is not None
        return result

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """The run's task instances: ``task_id``, ``state``, ``try_number``, ``hostname``,
        ``queued_when``, ``start_date``, ``end_date``, ``executor``, ... as the REST API gives them
        (Airflow 3 names the queued time ``queued_when``; ``queued_dttm`` is added as its alias)."""
        body = self._request(
            "GET",
            f"/dags/{_quote(dag_id)}/dagRuns/{_quote(run_id)}/taskInstances",
            params={"limit": 1000},
        )
        tis: list[dict[str, Any]] = body["task_instances"]
        for ti in tis:
            ti.setdefault("queued_dttm", ti.get("queued_when"))
        return tis

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        ti: dict[str, Any] = self._request(
            "GET",
            f"/dags/{_quote(dag_id)}/dagRuns/{_quote(run_id)}/taskInstances/{_quote(task_id)}",
        )
        ti.setdefault("queued_dttm", ti.get("queued_when"))
        return ti

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """The XCom's value, deserialized (``None`` where there is none)."""
        path = (
            f"/dags/{_quote(dag_id)}/dagRuns/{_quote(run_id)}/taskInstances/{_quote(task_id)}"
            f"/xcomEntries/{_quote(key)}"
        )
        response = self.client.get(path, params={"deserialize": True, "stringify": False})
        if response.status_code == 404:
            return None
        if response.is_error:
            raise AirflowError(f"GET {path}: {response.status_code} {response.text[:2000]}")
        return response.json()["value"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """The task's log as the UI shows it (the log API: local file or the worker's log
        server), one line per event."""
        path = (
            f"/dags/{_quote(dag_id)}/dagRuns/{_quote(run_id)}/taskInstances/{_quote(task_id)}"
            f"/logs/{try_number}"
        )
        body = self._request(
            "GET", path, params={"full_content": True}, headers={"accept": "application/json"}
        )
        lines = []
        for entry in body["content"]:
            if isinstance(entry, str):
                lines.append(entry)
                continue
            extra = {k: v for k, v in entry.items() if k not in _LOG_NOISE}
            line = " ".join(
                str(part)
                for part in (entry.get("timestamp"), entry.get("level"), entry.get("event"))
                if part
            )
            if extra:
                line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
            lines.append(line)
        return "\n".join(lines)

    def set_task_state(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        state: str = "failed",
        map_index: int | None = None,
    ) -> list[dict[str, Any]]:
        """Mark a task instance ``state`` through the REST API, as a user would in the UI; the
        task instances it changed."""
        params = {"map_index": map_index} if map_index is not None else {}
        body = self._request(
            "PATCH",
            f"/dags/{_quote(dag_id)}/dagRuns/{_quote(run_id)}/taskInstances/{_quote(task_id)}",
            params=params,
            json={"new_state": state},
        )
        tis: list[dict[str, Any]] = body.get("task_instances", [body])
        return tis

    def wait_task_state(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        states: Collection[str],
        timeout: float = RUN_TIMEOUT,
    ) -> dict[str, Any]:
        """Until the task instance's state is one of ``states``; the task instance."""

        def reached() -> dict[str, Any] | None:
            self._check_alive()
            ti = self.task_instance(dag_id, run_id, task_id)
            return ti if ti["state"] in states else None

        result: dict[str, Any] = self._wait(
            reached, timeout, f"task {dag_id}/{run_id}/{task_id} in {sorted(states)}"
        )
        return result


_LOG_NOISE = frozenset(
    {"event", "timestamp", "level", "logger", "sources", "filename", "lineno"}
    | {"dag_id", "run_id", "task_id", "ti_id", "map_index", "try_number"}
)
"""Keys of a structured log entry that :meth:`AirflowInstance.task_log` leaves out of a line
(the task's identity is the same on every line)."""


def _timestamp(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@contextmanager
def airflow_instance(
    home: Path,
    dags: Path,
    executor: str = "LocalExecutor",
    env: Mapping[str, str] | None = None,
) -> Iterator[AirflowInstance]:
    """A started :class:`AirflowInstance`, stopped (with every child) on exit."""
    instance = AirflowInstance(home, dags, executor, env)
    with instance:
        yield instance


def copy_dags(source: Path, target: Path) -> Path:
    """A private copy of a DAG folder (so DAG processors of parallel sessions never share
    ``__pycache__`` or see each other's files)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target
