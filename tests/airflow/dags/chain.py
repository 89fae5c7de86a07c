"""Three tasks a >> b >> c, each passing an XCom to the next (tests/airflow/test_harness.py)."""

from __future__ import annotations

import socket
from typing import Any

from airflow.sdk import dag, get_current_context, task


@dag(dag_id="chain", schedule=None, catchup=False, is_paused_upon_creation=False)
def chain() -> None:
    @task
    def a() -> dict[str, Any]:
        conf = get_current_context()["dag_run"].conf or {}
        print(f"chain.a says hello from {socket.gethostname()}")
        return {"n": int(conf.get("n", 1)), "path": ["a"]}

    @task
    def b(value: dict[str, Any]) -> dict[str, Any]:
        print(f"chain.b got {value}")
        return {"n": value["n"] * 10, "path": [*value["path"], "b"]}

    @task
    def c(value: dict[str, Any]) -> str:
        print(f"chain.c got {value}")
        return f"{value['n']}:{'>'.join([*value['path'], 'c'])}"

    c(b(a()))


chain()
