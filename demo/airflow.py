"""``make airflow-demo``: Apache Airflow 3 runs a fan-out DAG on two rexec agents.

It starts a rexec plane and an Airflow (API server, scheduler, DAG processor) whose executor is
``RexecExecutor``, two agents from the Airflow venv, then triggers ``rexec_fanout`` (one task
that lists the items, ``N`` mapped tasks, one that sums them) and prints, per task, the agent
that ran it, queued-to-running (Airflow's ``start_date - queued_when``) and run time.

The launchers are the ones the Airflow tests use (``tests/airflow``): one way to start these
processes, exercised by the tests on every run. Everything lives in a temporary folder, its own
RabbitMQ vhost and Redis prefix, and is stopped before the demo returns, also on Ctrl-C.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tests.airflow.harness import AirflowError, AirflowInstance, _timestamp, copy_dags
from tests.airflow.rexec_stack import EXECUTOR, POOL, RexecStack

DAGS = Path(__file__).resolve().parent.parent / "tests" / "airflow" / "dags"
TASKS = int(os.environ.get("REXEC_AIRFLOW_DEMO_TASKS", "24"))
SECONDS = float(os.environ.get("REXEC_AIRFLOW_DEMO_SECONDS", "1"))
"""How long each mapped task sleeps."""

console = Console()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="rexec-airflow-demo-") as tmp:
        home = Path(tmp)
        began = time.monotonic()
        console.print("[bold]starting[/] a rexec plane and Airflow 3 with RexecExecutor ...")
        (home / "rexec").mkdir()
        stack = RexecStack(home / "rexec", {"default": POOL})
        try:
            airflow = AirflowInstance(
                home / "airflow",
                copy_dags(DAGS, home / "dags"),
                EXECUTOR,
                stack.airflow_env(),
            )
            stack.airflow = airflow
            with airflow:
                for name in ("agent-1", "agent-2"):
                    stack.start_agent(name)
                console.print(
                    f"up in {time.monotonic() - began:.0f} s: Airflow at {airflow.base_url}, "
                    f"rexec at {stack.plane.settings.api_url}, agents agent-1 and agent-2"
                )
                return run(stack, airflow)
        except AirflowError as exc:
            console.print(f"[red]Airflow failed:[/] {exc}")
            return 1
        finally:
            stack.close()


def run(stack: RexecStack, airflow: AirflowInstance) -> int:
    airflow.wait_dag_parsed("rexec_fanout")
    console.print(f"triggering rexec_fanout: {TASKS} mapped tasks of {SECONDS:g} s each")
    triggered = time.monotonic()
    run_id = airflow.trigger("rexec_fanout", {"n": TASKS, "seconds": SECONDS})
    dag_run = airflow.wait_run("rexec_fanout", run_id, timeout=300)
    wall = time.monotonic() - triggered
    tis = sorted(
        airflow.task_instances("rexec_fanout", run_id),
        key=lambda ti: (_timestamp(ti["start_date"]), ti["map_index"]),
    )
    agents = agents_by_try(stack)
    table = Table(title=f"rexec_fanout {run_id}: {dag_run['state']}")
    for column in ("task", "try", "agent", "queued→running s", "run s", "state"):
        table.add_column(column, justify="right" if column.endswith("s") else "left")
    waits: list[float] = []
    for ti in tis:
        name = ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")
        waited = _timestamp(ti["start_date"]) - _timestamp(ti["queued_when"])
        ran = _timestamp(ti["end_date"]) - _timestamp(ti["start_date"])
        waits.append(waited)
        agent = agents.get((ti["id"], ti["try_number"]), "?")
        table.add_row(
            name, str(ti["try_number"]), agent, f"{waited:.2f}", f"{ran:.2f}", ti["state"]
        )
    console.print(table)
    console.print(
        f"{len(tis)} tasks in {wall:.1f} s from trigger to the run's end; queued→running "
        f"p50 {percentile(waits, 50):.2f} s, p95 {percentile(waits, 95):.2f} s, "
        f"max {max(waits):.2f} s"
    )
    slots = sum(a.concurrency for a in stack.client.list_agents(pool=POOL) if a.state == "online")
    console.print(
        f"({slots} slots in the pool: a task queued while every slot is busy waits for one, "
        "and that wait counts in its queued→running)"
    )
    return 0 if dag_run["state"] == "success" else 1


def agents_by_try(stack: RexecStack) -> dict[tuple[str, int], str]:
    """Which agent ran each Airflow try: the rexec task's agent, by the try in its workload."""
    pids = {process.pid: name for name, process in stack.agents.items()}
    names = {a.id: pids.get(a.pid, a.id) for a in stack.client.list_agents(pool=POOL)}
    found: dict[tuple[str, int], str] = {}
    for view in stack.client.list_tasks(pool=POOL, limit=1000):
        ti: dict[str, Any] = view.kwargs.get("workload", {}).get("ti", {})
        if ti and view.agent_id:
            found[(ti["id"], ti["try_number"])] = names.get(view.agent_id, view.agent_id)
    return found


def percentile(samples: list[float], pct: int) -> float:
    if len(samples) < 2:
        return samples[0] if samples else 0.0
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


if __name__ == "__main__":
    sys.exit(main())
