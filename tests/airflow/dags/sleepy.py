"""One task that sleeps ``conf["seconds"]`` (tests/airflow/test_harness.py marks it failed)."""

from __future__ import annotations

import time

from airflow.sdk import dag, get_current_context, task


@dag(dag_id="sleepy", schedule=None, catchup=False, is_paused_upon_creation=False)
def sleepy() -> None:
    @task
    def sleep() -> None:
        seconds = float((get_current_context()["dag_run"].conf or {}).get("seconds", 0))
        print(f"sleepy.sleep sleeps {seconds} s")
        time.sleep(seconds)

    sleep()


sleepy()
