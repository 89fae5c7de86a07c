"""A fan-out: one task maps over ``dag_run.conf["n"]`` items (make airflow-demo, bench/airflow)."""

from __future__ import annotations

import time

from airflow.sdk import dag, get_current_context, task


@dag(dag_id="rexec_fanout", schedule=None, catchup=False, is_paused_upon_creation=False)
def rexec_fanout() -> None:
    @task
    def items() -> list[int]:
        conf = get_current_context()["dag_run"].conf or {}
        return list(range(int(conf.get("n", 10))))

    @task
    def work(item: int) -> int:
        conf = get_current_context()["dag_run"].conf or {}
        time.sleep(float(conf.get("seconds", 0)))
        return item * item

    @task
    def total(squares: list[int]) -> int:
        return sum(squares)

    total(work.expand(item=items()))


rexec_fanout()
