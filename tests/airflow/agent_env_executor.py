"""An Airflow executor for the harness's own tests: runs each task as a rexec agent would.

Loaded by the scheduler of an :class:`~tests.airflow.harness.AirflowInstance` (in the Airflow
venv; the tests never import it). Each task is ``python -m
airflow.sdk.execution_time.execute_workload --json-string <workload>`` in a process whose
environment is only ``AirflowInstance.agent_env()`` and ``PATH``: a task that succeeds this way
needed nothing else (no metadata database, no JWT secret, no ``AIRFLOW_HOME`` of the instance).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from airflow.executors import workloads
from airflow.executors.base_executor import BaseExecutor

AGENT_ENV_VAR = "REXEC_TEST_AIRFLOW_AGENT_ENV"
"""JSON of ``AirflowInstance.agent_env()``, set by the harness in the scheduler's environment."""


class AgentEnvExecutor(BaseExecutor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._processes: dict[Any, subprocess.Popen[bytes]] = {}
        self._agent_env: dict[str, str] = json.loads(os.environ[AGENT_ENV_VAR])

    def _process_workloads(self, workload_items: Sequence[Any]) -> None:
        for workload in workload_items:
            if not isinstance(workload, workloads.ExecuteTask):
                raise TypeError(f"AgentEnvExecutor runs tasks only, not {type(workload).__name__}")
            key = workload.ti.key
            self.queued_tasks.pop(key, None)
            self.running.add(key)
            self._processes[key] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "airflow.sdk.execution_time.execute_workload",
                    "--json-string",
                    workload.model_dump_json(),
                ],
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self._agent_env},
                cwd="/",
                # In the scheduler's process group: the harness stops the group, these with it.
            )

    def sync(self) -> None:
        for key, process in list(self._processes.items()):
            code = process.poll()
            if code is None:
                continue
            del self._processes[key]
            if code == 0:
                self.success(key)
            else:
                self.fail(key, info=f"execute_workload exited {code}")

    def end(self) -> None:
        for process in self._processes.values():
            process.wait()
        self.sync()

    def terminate(self) -> None:
        for process in self._processes.values():
            process.terminate()
        self.end()
