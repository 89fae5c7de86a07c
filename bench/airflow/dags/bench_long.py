"""One 30 s task with one immediate retry, that records every start (bench/airflow failover).

``dag_run.conf``: ``seconds`` to run, ``marks`` a directory where each start writes
``<try>-<pid>.json`` (try, pid, the worker it ran on, the wall-clock start), so the harness
sees a new try and also the same try started again, and knows which worker to fault.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

from airflow.sdk import dag, get_current_context, task


@dag(
    dag_id="bench_long",
    schedule=None,
    catchup=False,
    is_paused_upon_creation=False,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=0)},
)
def bench_long() -> None:
    @task
    def long() -> int:
        context = get_current_context()
        conf = context["dag_run"].conf or {}
        ti = context["ti"]
        worker = os.environ.get("BENCH_WORKER") or os.environ.get("TEST_AGENT_NAME", "?")
        mark = {"try": ti.try_number, "pid": os.getpid(), "worker": worker, "started": time.time()}
        marks = Path(conf["marks"])
        marks.mkdir(parents=True, exist_ok=True)
        part = marks / f".{ti.try_number}-{os.getpid()}.json"
        part.write_text(json.dumps(mark))
        part.rename(marks / f"{ti.try_number}-{os.getpid()}.json")  # never seen half-written
        time.sleep(float(conf.get("seconds", 30)))
        return int(ti.try_number)

    long()


bench_long()
