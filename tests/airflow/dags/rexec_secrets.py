"""A task that reads a variable and a connection the agent resolves (tests/airflow).

Neither is known to Airflow's metadata database or the rexec plane: the agent's environment
(``AIRFLOW_VAR_*``, ``AIRFLOW_CONN_*``, Airflow's environment secrets backend) holds them. The
task returns only digests, so the values never travel back."""

from __future__ import annotations

import hashlib

from airflow.sdk import BaseHook, Variable, dag, task


@dag(dag_id="rexec_secrets", schedule=None, catchup=False, is_paused_upon_creation=False)
def rexec_secrets() -> None:
    @task
    def read() -> dict[str, str]:
        variable = Variable.get("rexec_canary")
        connection = BaseHook.get_connection("rexec_warehouse")
        return {
            "variable": hashlib.sha256(variable.encode()).hexdigest(),
            "password": hashlib.sha256((connection.password or "").encode()).hexdigest(),
            "host": connection.host or "",
        }

    read()


rexec_secrets()
