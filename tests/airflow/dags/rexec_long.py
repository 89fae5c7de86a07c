"""One long task, with one Airflow retry, that records each of its tries (tests/airflow).

``dag_run.conf``: ``seconds`` to run, ``marks`` a directory where each try writes
``<try_number>.json`` (its pid, the agent it ran on) as it starts, so a test knows when and
where a try runs and can check its processes are gone."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

from airflow.sdk import dag, get_current_context, task


@dag(
    dag_id="rexec_long",
    schedule=None,
    catchup=False,
    is_paused_upon_creation=False,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=0)},
)
def rexec_long() -> None:
    @task
    def long() -> dict[str, object]:
        context = get_current_context()
        conf = context["dag_run"].conf or {}
        ti = context["ti"]
        mark = {"pid": os.getpid(), "agent": os.environ.get("TEST_AGENT_NAME", "?")}
        marks = Path(conf["marks"])
        marks.mkdir(parents=True, exist_ok=True)
        (marks / f"{ti.try_number}.json").write_text(json.dumps(mark))
        print(f"rexec_long try {ti.try_number} runs on {mark['agent']} as pid {mark['pid']}")
        time.sleep(float(conf.get("seconds", 20)))
        return {"try": ti.try_number, **mark}

    long()


rexec_long()
