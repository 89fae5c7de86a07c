"""The harness against a real Airflow 3 with the LocalExecutor: runs, XComs, logs, the REST API."""

from __future__ import annotations

import time

from tests.airflow.harness import NO_DATABASE, AirflowInstance


def test_chain_runs_with_xcoms_and_logs(local_airflow: AirflowInstance) -> None:
    airflow = local_airflow
    assert airflow.started_in is not None
    print(f"Airflow started in {airflow.started_in:.1f} s")
    airflow.wait_dag_parsed("chain")

    began = time.monotonic()
    run_id = airflow.trigger("chain", conf={"n": 4})
    run = airflow.wait_run("chain", run_id)
    print(f"chain ran in {time.monotonic() - began:.1f} s")
    assert run["state"] == "success", airflow.task_instances("chain", run_id)
    assert run["conf"] == {"n": 4}

    tis = {ti["task_id"]: ti for ti in airflow.task_instances("chain", run_id)}
    assert set(tis) == {"a", "b", "c"}
    for ti in tis.values():
        assert ti["state"] == "success"
        assert ti["try_number"] == 1
        assert ti["hostname"]
        assert ti["queued_dttm"] and ti["start_date"] and ti["end_date"]
    # a >> b >> c: each starts after the one before it ended.
    assert tis["a"]["end_date"] <= tis["b"]["start_date"]
    assert tis["b"]["end_date"] <= tis["c"]["start_date"]

    assert airflow.xcom("chain", run_id, "a") == {"n": 4, "path": ["a"]}
    assert airflow.xcom("chain", run_id, "b") == {"n": 40, "path": ["a", "b"]}
    assert airflow.xcom("chain", run_id, "c") == "40:a>b>c"
    assert airflow.xcom("chain", run_id, "a", key="no_such_key") is None

    log = airflow.task_log("chain", run_id, "a", try_number=1)
    assert "chain.a says hello from" in log, log
    assert "chain.b got {'n': 4, 'path': ['a']}" in airflow.task_log("chain", run_id, "b")


def test_agent_env_runs_tasks_without_the_metadata_database(
    local_airflow: AirflowInstance,
) -> None:
    """agent_env() is enough for a worker: tests/airflow/agent_env_executor.py runs each task
    with only it (and PATH), and its database URL leads nowhere."""
    airflow = local_airflow
    env = airflow.agent_env()
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == airflow.execution_api_url
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(airflow.dags)
    assert "AIRFLOW__API_AUTH__JWT_SECRET" not in env
    airflow.wait_dag_parsed("agent_env")

    run_id = airflow.trigger("agent_env")
    run = airflow.wait_run("agent_env", run_id)
    assert run["state"] == "success", airflow.task_instances("agent_env", run_id)
    # The supervisor (execute_workload) had NO_DATABASE; the task SDK gives the task process
    # a URL of its own that no driver opens ("airflow-db-not-allowed:///" in Airflow 3.3).
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == NO_DATABASE
    seen = airflow.xcom("agent_env", run_id, "produce")["db"]
    assert seen not in (NO_DATABASE, airflow.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert airflow.xcom("agent_env", run_id, "consume") == "got " + seen
    for ti in airflow.task_instances("agent_env", run_id):
        assert ti["executor"] == "agent_env"
    assert "runs without the metadata database" in airflow.task_log("agent_env", run_id, "produce")


def test_mark_failed_and_scheduler_restart(local_airflow: AirflowInstance) -> None:
    """set_task_state marks a running task failed; the run fails. A stopped scheduler runs
    nothing; started again, it runs the run queued meanwhile."""
    airflow = local_airflow
    airflow.wait_dag_parsed("sleepy")

    run_id = airflow.trigger("sleepy", conf={"seconds": 600})
    airflow.wait_task_state("sleepy", run_id, "sleep", {"running"})
    changed = airflow.set_task_state("sleepy", run_id, "sleep", "failed")
    assert [ti["state"] for ti in changed] == ["failed"]
    run = airflow.wait_run("sleepy", run_id)
    assert run["state"] == "failed"
    assert airflow.task_instance("sleepy", run_id, "sleep")["state"] == "failed"

    airflow.stop_scheduler()
    run_id = airflow.trigger("sleepy", conf={"seconds": 0})
    assert airflow.dag_run("sleepy", run_id)["state"] == "queued"
    airflow.start_scheduler()
    assert airflow.wait_run("sleepy", run_id)["state"] == "success"
