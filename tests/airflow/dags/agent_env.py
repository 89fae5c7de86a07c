"""One task run by tests/airflow/agent_env_executor.py with only the harness's agent_env()."""

from __future__ import annotations

import os

from airflow.sdk import dag, task


@dag(dag_id="agent_env", schedule=None, catchup=False, is_paused_upon_creation=False)
def agent_env() -> None:
    @task(executor="agent_env")
    def produce() -> dict[str, str]:
        print("agent_env.produce runs without the metadata database")
        return {"db": os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]}

    @task(executor="agent_env")
    def consume(value: dict[str, str]) -> str:
        # An XCom pulled through the Execution API, then one pushed: all the worker's state.
        return "got " + value["db"]

    consume(produce())


agent_env()
