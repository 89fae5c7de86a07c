"""A rexec plane, its agents and an Airflow whose executor is ``RexecExecutor``, for tests.

The plane (``rexec serve``) runs from rexec's venv, on a RabbitMQ vhost, a Redis prefix and a
SQLite file of its own (not the session's vhost, whose queues are deleted after every test:
this plane lives for a whole module). The agents run from the Airflow venv, since they run the
task SDK; each carries ``TEST_AGENT_NAME``, which the test DAGs record.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from rexec.client import RexecClient, TaskView
from rexec.schemas.settings import load_settings
from tests.airflow.harness import AirflowInstance
from tests.conftest import (
    AMQP_HOST,
    BOOTSTRAP_KEY,
    MANAGEMENT_URL,
    REDIS_URL,
    SIGNER,
    SIGNING_KEY,
    forget_redis_prefix,
)
from tests.e2e.conftest import Plane
from tests.support import Process, free_port, wait_until

EXECUTOR = "rexec.airflow.executor.RexecExecutor"
POOL = "airflow"
HEARTBEAT_TTL = 3.0
"""The agents' heartbeat TTL: the watchdog declares an agent lost this long after its last beat."""


class RexecStack:
    """One rexec plane with pools for Airflow, its agents, and the Airflow that uses them."""

    def __init__(self, home: Path, pools: Mapping[str, str]) -> None:
        self.home = home
        self.vhost = f"rexec-airflow-{uuid.uuid4().hex[:8]}"
        self.redis_prefix = f"rexec-airflow-{uuid.uuid4().hex[:8]}"
        self._management = httpx.Client(
            base_url=MANAGEMENT_URL, auth=("guest", "guest"), timeout=30
        )
        self._management.put(f"/api/vhosts/{quote(self.vhost, safe='')}").raise_for_status()
        database_url = f"sqlite+aiosqlite:///{home / 'rexec.db'}"
        from rexec.dispatcher.db.migrate import upgrade

        upgrade(database_url)
        settings = load_settings(
            {},
            database_url=database_url,
            amqp_url=f"amqp://guest:guest@{AMQP_HOST}/{quote(self.vhost, safe='')}",
            redis_url=REDIS_URL,
            redis_prefix=self.redis_prefix,
            heartbeat_ttl=HEARTBEAT_TTL,
            signing_key=SIGNING_KEY,
            signing_public_keys=SIGNER.public_key,
            api_key=BOOTSTRAP_KEY,
            management_url=MANAGEMENT_URL.replace("://", "://guest:guest@", 1),
        )
        (home / "plane").mkdir()
        self.plane = Plane(settings, home / "plane")
        self.client: RexecClient = self.plane.client
        for pool in sorted(set(pools.values())):
            self.client.create_pool(pool)
        # The scheduler's key: a submitter (it submits, cancels and reads logs), from a file.
        key = self.client.create_api_key("submitter", "airflow-scheduler").secret
        self.key_file = home / "rexec-api-key"
        self.key_file.write_text(key + "\n")
        self.key_file.chmod(0o600)
        self.pools = dict(pools)
        self.airflow: AirflowInstance | None = None
        self.agents: dict[str, Process] = {}

    def airflow_env(self) -> dict[str, str]:
        """What the scheduler, API server and DAG processor get: the ``[rexec]`` section."""
        return {
            "AIRFLOW__REXEC__API_URL": self.plane.settings.api_url,
            "AIRFLOW__REXEC__API_KEY_FILE": str(self.key_file),
            "AIRFLOW__REXEC__POOLS": ",".join(f"{q}={p}" for q, p in self.pools.items()),
            "AIRFLOW__REXEC__DEFAULT_POOL": POOL,
            "AIRFLOW__REXEC__FEED_WAIT": "5",
            "AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS": "rexec.airflow.logs.LOGGING_CONFIG",
            # Not the bootstrap key the test process exports: the file's key is the one to use.
            "REXEC_API_KEY": "",
        }

    def start_agent(
        self,
        name: str,
        pool: str = POOL,
        env: Mapping[str, str] | None = None,
        concurrency: int = 4,
    ) -> Process:
        """A rexec agent of ``pool`` in the Airflow venv, with Airflow's worker settings."""
        assert self.airflow is not None
        port = free_port()
        token = self.client.create_token(pool, name).secret
        python = str(self.airflow.venv / "bin" / "python")
        argv = [python, "-m", "rexec.worker.cli", "--pool", pool]
        argv += ["--allow", "rexec.airflow.runner:*", "--concurrency", str(concurrency)]
        process = Process(
            argv,
            {
                **self.plane.env,
                **self.airflow.agent_env(),
                "REXEC_AGENT_TOKEN": token,
                "REXEC_HEALTH_PORT": str(port),
                "REXEC_AGENT_LOG_URL": f"http://127.0.0.1:{port}",
                "REXEC_LOG_DIR": str(self.home / "agent-logs" / name),
                "TEST_AGENT_NAME": name,
                **(env or {}),
            },
            self.home / f"agent-{name}.log",
        )
        self.agents[name] = process
        wait_until(
            lambda: (
                any(
                    a.hostname and a.pid == process.pid and a.state == "online"
                    for a in self.client.list_agents(pool=pool)
                )
                or process.popen.poll() is not None
            ),
            timeout=120,
            what=f"agent {name} online",
        )
        assert process.popen.poll() is None, f"agent {name} exited:\n{process.output()[-3000:]}"
        return process

    def kill_agent(self, name: str) -> None:
        """kill -9 of the agent's own process (as an OOM kill does); its children hear it die."""
        os.kill(self.agents[name].pid, signal.SIGKILL)

    def task_of(self, ti: Mapping[str, Any]) -> TaskView:
        """The rexec task of one Airflow try (the REST API does not show its
        ``external_executor_id``, so it is found by the try in its workload)."""
        pool = self.pools.get(ti.get("queue") or "default", POOL)
        found = [
            view
            for view in self.client.list_tasks(pool=pool, limit=1000)
            if view.kwargs.get("workload", {}).get("ti", {}).get("id") == ti["id"]
            and view.kwargs["workload"]["ti"]["try_number"] == ti["try_number"]
            and not (view.idempotency_key or "").startswith("replay-")
        ]
        assert len(found) == 1, (
            f"{len(found)} rexec tasks for {ti['task_id']} try {ti['try_number']}"
        )
        return found[0]

    def ended_task_of(self, ti: Mapping[str, Any], timeout: float = 60) -> TaskView:
        """The rexec task of a try Airflow saw end, once rexec saw it end too: the supervisor
        tells Airflow before the agent tells rexec."""
        task_id = self.task_of(ti).id
        ended: TaskView = wait_until(
            lambda: (
                (view := self.client.get(task_id)).state.value not in {"queued", "running"} and view
            ),
            timeout=timeout,
            what=f"rexec task {task_id} ended",
        )
        return ended

    def close(self) -> None:
        for process in self.agents.values():
            process.stop()
        self.plane.close()
        self._management.delete(f"/api/vhosts/{quote(self.vhost, safe='')}")
        self._management.close()
        forget_redis_prefix(self.redis_prefix)

    def dump(self) -> str:
        parts = [self.plane.dump_logs()]
        for name, process in self.agents.items():
            parts.append(f"--- agent {name}\n{process.output()[-4000:]}")
        if self.airflow is not None:
            parts.append(self.airflow.diagnostics())
        return "\n".join(parts)
