"""Apache Airflow 3 runs its tasks on rexec agents: a real scheduler, API server and DAG
processor with ``RexecExecutor``, a real rexec plane and real agents in the Airflow venv.

One Airflow and one plane serve the whole module (starting them takes most of a minute). Each
test uses its own DAG run, and the faults are real: kill -9 of an agent, an agent whose
Execution API never answers, a replayed workload, a drained pool, a try marked failed in the
UI's API, a scheduler stopped and started again.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rexec.client import RexecClient, SubmitTask, TaskView
from tests.airflow.conftest import AirflowFactory
from tests.airflow.rexec_stack import EXECUTOR, HEARTBEAT_TTL, POOL, RexecStack
from tests.conftest import BOOTSTRAP_KEY
from tests.support import wait_until

TASK_QUEUED_TIMEOUT = 60
"""Airflow's ``task_queued_timeout`` here (600 s by default), which is also the lifetime of a
workload's token: a try that waits longer is revoked by the scheduler or expired by rexec."""
BLACKHOLE_POOL = "airflow-blackhole"
DRAINED_POOL = "airflow-drained"
CANARY = "canary-" + os.urandom(8).hex()
WAREHOUSE_PASSWORD = "pw-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def stack(
    airflow_factory: AirflowFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RexecStack]:
    home = tmp_path_factory.mktemp("rexec-stack")
    stack = RexecStack(
        home, {"default": POOL, "blackhole": BLACKHOLE_POOL, "drained": DRAINED_POOL}
    )
    try:
        stack.client.drain_pool(DRAINED_POOL)
        env = {
            **stack.airflow_env(),
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(TASK_QUEUED_TIMEOUT),
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
            # Not retried again in queued: one revoke, then the try fails.
            "AIRFLOW__SCHEDULER__NUM_STUCK_IN_QUEUED_RETRIES": "0",
        }
        stack.airflow = airflow_factory(executor=EXECUTOR, env=env, name="rexec-airflow")
        secrets = {
            "AIRFLOW_VAR_REXEC_CANARY": CANARY,
            "AIRFLOW_CONN_REXEC_WAREHOUSE": json.dumps(
                {
                    "conn_type": "postgres",
                    "host": "warehouse.internal",
                    "password": WAREHOUSE_PASSWORD,
                }
            ),
        }
        stack.start_agent("a1", env=secrets)
        stack.start_agent("a2", env=secrets)
        yield stack
    finally:
        stack.close()


@pytest.fixture
def airflow(stack: RexecStack, request: pytest.FixtureRequest) -> Iterator[Any]:
    yield stack.airflow
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(stack.dump())


def ti_of(airflow: Any, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
    result: dict[str, Any] = airflow.task_instance(dag_id, run_id, task_id)
    return result


def marks(path: Path) -> dict[int, dict[str, Any]]:
    """The tries of ``rexec_long`` that started, by try number."""
    found: dict[int, dict[str, Any]] = {}
    for file in path.glob("*.json"):
        try:
            found[int(file.stem)] = json.loads(file.read_text())
        except ValueError:
            continue  # being written
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def submitted(
    airflow: Any, stack: RexecStack, dag_id: str, run_id: str, task_id: str
) -> tuple[dict[str, Any], TaskView]:
    """The try once the executor submitted it, and its rexec task."""

    def found() -> tuple[dict[str, Any], TaskView] | None:
        ti = ti_of(airflow, dag_id, run_id, task_id)
        if ti["state"] != "queued":
            return None
        try:
            return ti, stack.task_of(ti)
        except AssertionError:
            return None

    return wait_until(found, timeout=120, what=f"{dag_id}.{task_id} submitted to rexec")


def queued_to_running(ti: dict[str, Any]) -> float:
    from tests.airflow.harness import _timestamp

    return _timestamp(ti["start_date"]) - _timestamp(ti["queued_when"])


def test_a_chain_runs_on_agents_with_xcoms_and_its_logs_read_from_the_agent(
    airflow: Any, stack: RexecStack
) -> None:
    run_id = airflow.trigger("chain", {"n": 4})
    run = airflow.wait_run("chain", run_id)
    assert run["state"] == "success", stack.dump()
    assert airflow.xcom("chain", run_id, "c") == "40:a>b>c"
    latencies = []
    for task_id in ("a", "b", "c"):
        ti = ti_of(airflow, "chain", run_id, task_id)
        assert (ti["state"], ti["try_number"]) == ("success", 1)
        view = stack.ended_task_of(ti)
        assert (view.pool, view.state.value, view.result, view.attempt) == (
            POOL,
            "succeeded",
            0,
            1,
        )
        assert view.target == "rexec.airflow.runner:run_workload"
        latencies.append(queued_to_running(ti))
        log = airflow.task_log("chain", run_id, task_id)
        assert f"chain.{task_id}" in log, log
        assert f"read from agent {view.agent_id}" in log, log
    print(f"queued-to-running of the chain's tries: {[round(s, 2) for s in latencies]} s")


def test_the_workload_and_its_token_are_hidden_from_viewers(
    airflow: Any, stack: RexecStack
) -> None:
    run_id = airflow.trigger("chain", {"n": 1})
    assert airflow.wait_run("chain", run_id)["state"] == "success"
    view = stack.task_of(ti_of(airflow, "chain", run_id, "a"))
    viewer_key = stack.client.create_api_key("viewer", "airflow-viewer").secret
    with RexecClient(stack.plane.settings.api_url, api_key=viewer_key) as viewer:
        seen = viewer.get(view.id)
    assert seen.sensitive and seen.args == [] and seen.kwargs == {}
    token = stack.client.get(view.id).kwargs["workload"]["token"]
    assert token and token.count(".") == 2  # a JWT, which the submitter may see
    audit = json.dumps([msgspec_to_builtins(e) for e in stack.client.audit(limit=500)])
    assert token not in audit
    assert token not in stack.plane.dump_logs()
    for process in stack.agents.values():
        assert token not in process.output()
    assert token not in " ".join(_all_command_lines())


def msgspec_to_builtins(value: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(value)


def _all_command_lines() -> list[str]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
    return lines


def test_a_replayed_workload_is_refused_and_not_retried(airflow: Any, stack: RexecStack) -> None:
    run_id = airflow.trigger("chain", {"n": 2})
    assert airflow.wait_run("chain", run_id)["state"] == "success"
    original = stack.client.get(stack.task_of(ti_of(airflow, "chain", run_id, "a")).id)
    [replay_id] = stack.client.submit_many(
        [
            SubmitTask(
                pool=POOL,
                target=original.target,
                kwargs=original.kwargs,
                max_attempts=3,
                idempotency_key="replay-" + original.id,
            )
        ]
    )
    [replay] = stack.client.wait([replay_id], timeout=120)
    assert replay.state.value == "failed", replay
    assert replay.attempt == 1  # refused for good: no second attempt
    assert replay.error is not None
    assert replay.error["type"] == "TryRefused"
    assert "409" in replay.error["message"]


def test_kill_9_of_the_agent_running_a_try_runs_the_next_try_elsewhere(
    airflow: Any, stack: RexecStack, tmp_path: Path
) -> None:
    run_id = airflow.trigger("rexec_long", {"seconds": 20, "marks": str(tmp_path)})
    first = wait_until(lambda: marks(tmp_path).get(1), timeout=180, what="try 1 started")
    victim = first["agent"]
    stack.kill_agent(victim)
    killed_at = time.monotonic()
    second = wait_until(lambda: marks(tmp_path).get(2), timeout=120, what="try 2 started")
    failover = time.monotonic() - killed_at
    print(f"kill -9 of {victim}: try 2 ran on {second['agent']} {failover:.1f} s later")
    assert second["agent"] != victim
    assert failover <= HEARTBEAT_TTL + 10, f"try 2 started {failover:.1f} s after the kill"
    wait_until(lambda: not pid_alive(first["pid"]), timeout=30, what="try 1's process gone")
    run = airflow.wait_run("rexec_long", run_id)
    assert run["state"] == "success"
    ti = ti_of(airflow, "rexec_long", run_id, "long")
    assert ti["try_number"] == 2
    # Try 1 on rexec: its second attempt (on the other agent) was refused at once, for good.
    # (Airflow 3 gives each try a task instance id of its own: found by run and try number.)
    [try_1] = [
        view
        for view in stack.client.list_tasks(pool=POOL, limit=1000)
        if (w := view.kwargs.get("workload", {}).get("ti", {})).get("run_id") == run_id
        and w.get("task_id") == "long"
        and w.get("try_number") == 1
    ]
    assert (try_1.state.value, try_1.attempt) == ("failed", 2), try_1
    assert try_1.error is not None and try_1.error["type"] == "TryRefused", try_1.error
    stack.agents.pop(victim).stop()
    stack.start_agent(victim + "-again")


def test_an_agent_lost_before_the_try_started_reruns_the_same_try(
    airflow: Any, stack: RexecStack
) -> None:
    """The agent claims the try, but its Execution API never answers (a black hole): the
    supervisor's ``run`` call is still pending when the agent is killed. Another agent then
    starts the same try: Airflow saw no start, so the try number does not change."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # accepts connections into the backlog, never answers
        url = f"http://127.0.0.1:{hole.getsockname()[1]}/execution/"
        stack.start_agent(
            "stuck", BLACKHOLE_POOL, env={"AIRFLOW__CORE__EXECUTION_API_SERVER_URL": url}
        )
        run_id = airflow.trigger("rexec_blackhole")
        ti, view = submitted(airflow, stack, "rexec_blackhole", run_id, "on_blackhole")
        wait_until(
            lambda: stack.client.get(view.id).state.value == "running", timeout=120, what="claimed"
        )
        stack.kill_agent("stuck")
        stack.start_agent("rescuer", BLACKHOLE_POOL)
        run = airflow.wait_run("rexec_blackhole", run_id)
    assert run["state"] == "success", stack.dump()
    ti = ti_of(airflow, "rexec_blackhole", run_id, "on_blackhole")
    assert ti["try_number"] == 1
    view = stack.ended_task_of(ti)
    assert (view.state.value, view.attempt) == ("succeeded", 2)
    stack.agents.pop("stuck").stop()


def test_task_queued_timeout_with_a_drained_pool_ends_the_rexec_task_unstarted(
    airflow: Any, stack: RexecStack
) -> None:
    run_id = airflow.trigger("rexec_drained")
    _ti, view = submitted(airflow, stack, "rexec_drained", run_id, "on_drained")
    assert view.state.value == "queued"
    run = airflow.wait_run("rexec_drained", run_id, timeout=TASK_QUEUED_TIMEOUT + 120)
    assert run["state"] == "failed"
    ended: TaskView = wait_until(
        lambda: (v := stack.client.get(view.id)).state.value in {"cancelled", "expired"} and v,
        timeout=60,
        what="the rexec task ended",
    )
    assert ended.started_at is None
    print(f"a try stuck in a drained pool ended {ended.state.value} on rexec")


def test_a_try_marked_failed_in_airflow_leaves_no_process_behind(
    airflow: Any, stack: RexecStack, tmp_path: Path
) -> None:
    run_id = airflow.trigger("rexec_long", {"seconds": 300, "marks": str(tmp_path)})
    first = wait_until(lambda: marks(tmp_path).get(1), timeout=180, what="try 1 started")
    ti = ti_of(airflow, "rexec_long", run_id, "long")
    log = airflow.task_log("rexec_long", run_id, "long")  # while it runs: the executor reads it
    assert "rexec_long try 1 runs on" in log, log
    airflow.set_task_state("rexec_long", run_id, "long", "failed")
    wait_until(lambda: not pid_alive(first["pid"]), timeout=60, what="the task process gone")
    view = wait_until(
        lambda: (v := stack.task_of(ti)).state.value in {"failed", "cancelled"} and v,
        timeout=60,
        what="the rexec task ended",
    )
    assert view.attempt == 1
    assert 2 not in marks(tmp_path)


def test_a_restarted_scheduler_adopts_the_running_tries(
    airflow: Any, stack: RexecStack, tmp_path: Path
) -> None:
    run_id = airflow.trigger("rexec_long", {"seconds": 25, "marks": str(tmp_path)})
    wait_until(lambda: marks(tmp_path).get(1), timeout=180, what="try 1 started")
    airflow.stop_scheduler()
    airflow.start_scheduler()
    run = airflow.wait_run("rexec_long", run_id)
    assert run["state"] == "success", stack.dump()
    ti = ti_of(airflow, "rexec_long", run_id, "long")
    assert ti["try_number"] == 1  # adopted, not reset and run again
    assert list(marks(tmp_path)) == [1]
    assert "adopted 1 tries" in airflow.scheduler.output()


def test_variables_and_connections_resolve_on_the_agent(airflow: Any, stack: RexecStack) -> None:
    import hashlib

    run_id = airflow.trigger("rexec_secrets")
    assert airflow.wait_run("rexec_secrets", run_id)["state"] == "success"
    digests = airflow.xcom("rexec_secrets", run_id, "read")
    assert digests == {
        "variable": hashlib.sha256(CANARY.encode()).hexdigest(),
        "password": hashlib.sha256(WAREHOUSE_PASSWORD.encode()).hexdigest(),
        "host": "warehouse.internal",
    }
    assert CANARY not in stack.plane.dump_logs()
    with RexecClient(stack.plane.settings.api_url, api_key=BOOTSTRAP_KEY) as admin:
        view = stack.task_of(ti_of(airflow, "rexec_secrets", run_id, "read"))
        assert CANARY not in json.dumps(msgspec_to_builtins(admin.get(view.id)))
