"""One-task DAGs on Airflow queues that map to rexec pools of their own (tests/airflow):
``blackhole`` (agents whose Execution API never answers) and ``drained`` (no agent takes it)."""

from __future__ import annotations

from airflow.sdk import dag, task


@dag(dag_id="rexec_blackhole", schedule=None, catchup=False, is_paused_upon_creation=False)
def rexec_blackhole() -> None:
    @task(queue="blackhole")
    def on_blackhole() -> str:
        return "ran"

    on_blackhole()


@dag(dag_id="rexec_drained", schedule=None, catchup=False, is_paused_upon_creation=False)
def rexec_drained() -> None:
    @task(queue="drained")
    def on_drained() -> str:
        return "ran"

    on_drained()


rexec_blackhole()
rexec_drained()
