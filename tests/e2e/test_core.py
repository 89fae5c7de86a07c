"""The core, end to end: ``rexec serve`` and ``rexec-agent`` processes on the real services.

Each test runs on SQLite and on PostgreSQL (the ``settings`` fixture is parametrised).
"""

from __future__ import annotations

import json
import subprocess
import sys

from rexec.schemas.api import SubmitTask, TaskState
from tests.e2e.conftest import Plane
from tests.support import wait_until

ALLOW = ["--allow", "tests.tasks:*", "--allow", "echo"]


def test_tasks_of_every_kind_run_end_to_end(plane: Plane, pool_name: str) -> None:
    client = plane.client
    client.create_pool(pool_name)
    plane.start_agent(pool_name, "--concurrency", "4", *ALLOW)
    add = client.submit(pool_name, "tests.tasks:add", args=[2, 3])
    async_add = client.submit(pool_name, "tests.tasks:async_add", kwargs={"x": 1, "y": 2})
    command = client.submit(pool_name, command=["echo", "hello", "world"])
    failing = client.submit(
        pool_name, "tests.tasks:fail", args=["nope"], max_attempts=2, retry_backoff=0.05
    )
    refused = client.submit(pool_name, "os:getcwd")

    done = {
        t.id: t
        for t in client.wait([add.id, async_add.id, command.id, failing.id, refused.id], timeout=60)
    }

    assert (done[add.id].state, done[add.id].result) == (TaskState.SUCCEEDED, 5)
    assert (done[async_add.id].state, done[async_add.id].result) == (TaskState.SUCCEEDED, 3)
    assert done[command.id].state is TaskState.SUCCEEDED
    assert done[command.id].result["exit_code"] == 0
    assert "hello world" in done[command.id].result["output"]

    assert (done[failing.id].state, done[failing.id].attempt) == (TaskState.FAILED, 2)
    assert done[failing.id].error is not None and "nope" in done[failing.id].error["message"]
    attempts = [(h.attempt, h.to_state) for h in client.history(failing.id)]
    assert attempts == [(1, "queued"), (1, "running"), (1, "queued"), (2, "running"), (2, "failed")]

    assert (done[refused.id].state, done[refused.id].attempt) == (TaskState.FAILED, 1)
    assert (
        done[refused.id].error is not None and done[refused.id].error["type"] == "TargetNotAllowed"
    )


def test_many_tasks_in_two_pools_complete_exactly_once(plane: Plane, pool_name: str) -> None:
    client = plane.client
    pools = [f"{pool_name}a", f"{pool_name}b"]
    for pool in pools:
        client.create_pool(pool)
        plane.start_agent(pool, "--concurrency", "8", *ALLOW, name=f"agent-{pool}")
    ids = client.submit_many(
        [SubmitTask(pool=pools[i % 2], target="tests.tasks:add", args=[i, 1]) for i in range(400)]
    )
    done = client.wait(ids, timeout=90)
    assert [t.state for t in done] == [TaskState.SUCCEEDED] * 400
    assert [t.result for t in done] == [i + 1 for i in range(400)]
    assert {t.pool for t in done} == set(pools)
    for task in done[:40]:
        assert [h.to_state for h in client.history(task.id)].count("succeeded") == 1


def test_a_final_exit_code_fails_a_command_task_with_no_retry(plane: Plane, pool_name: str) -> None:
    """A command exits with a code its task names as final: failed at its first attempt. Any
    other non-zero code is retried as before."""
    client = plane.client
    client.create_pool(pool_name)
    plane.start_agent(pool_name, "--allow", "sh")
    final = client.submit(
        pool_name, command=["sh", "-c", "exit 3"], final_exit_codes=[3, 64], max_attempts=3
    )
    other = client.submit(
        pool_name,
        command=["sh", "-c", "exit 4"],
        final_exit_codes=[3],
        max_attempts=2,
        retry_backoff=0,
    )
    done = {t.id: t for t in client.wait([final.id, other.id], timeout=60)}
    assert (done[final.id].state, done[final.id].attempt) == (TaskState.FAILED, 1)
    assert done[final.id].final_exit_codes == [3, 64]
    error = done[final.id].error or {}
    assert error["type"] == "CommandFailed", error
    assert error["message"] == "exit code 3 (a final exit code: not retried)"
    assert (done[other.id].state, done[other.id].attempt) == (TaskState.FAILED, 2)


def test_cancel_a_running_task_and_a_queued_one(plane: Plane, pool_name: str) -> None:
    client = plane.client
    client.create_pool(pool_name)
    plane.start_agent(pool_name, "--concurrency", "2", *ALLOW)
    running = client.submit(pool_name, "tests.tasks:sleep", args=[60])
    wait_until(lambda: client.get(running.id).state is TaskState.RUNNING, 30, "the task to start")
    client.cancel(running.id)
    [cancelled] = client.wait([running.id], timeout=30)
    assert cancelled.state is TaskState.CANCELLED

    client.drain_pool(pool_name)
    queued = client.submit(pool_name, "tests.tasks:add", args=[1, 1])
    client.cancel(queued.id)
    client.resume_pool(pool_name)
    after = client.submit(pool_name, "tests.tasks:add", args=[2, 2])
    assert client.wait([after.id], timeout=30)[0].state is TaskState.SUCCEEDED
    assert client.get(queued.id).state is TaskState.CANCELLED
    assert [h.to_state for h in client.history(queued.id)] == ["queued", "cancelled"]


def test_the_cli_submits_waits_and_reports(plane: Plane, pool_name: str) -> None:
    def rexec(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rexec.client.cli", "--api-url", plane.settings.api_url, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert rexec("pool", "create", pool_name).returncode == 0
    token = rexec("token", "create", "--pool", pool_name).stdout.strip()
    plane.start_agent(pool_name, *ALLOW, token=token)

    ok = rexec(
        "submit", "--pool", pool_name, "tests.tasks:add", "--args", "[20, 22]"
    ).stdout.strip()
    bad = rexec(
        "submit", "--pool", pool_name, "tests.tasks:fail", "--max-attempts", "1"
    ).stdout.strip()
    cmd = rexec(
        "submit", "--pool", pool_name, "--command", "--", "echo", "from the cli"
    ).stdout.strip()
    assert rexec("wait", ok, cmd).returncode == 0
    assert rexec("wait", ok, bad).returncode != 0, "wait fails when any task did not succeed"

    status = json.loads(rexec("status", ok, "--json").stdout)
    assert (status["state"], status["result"]) == ("succeeded", 42)
    listed = json.loads(rexec("tasks", "--pool", pool_name, "--json").stdout)
    assert {t["id"] for t in listed} == {ok, bad, cmd}
    agents = json.loads(rexec("agents", "--json").stdout)
    assert any(a["pool"] == pool_name and a["state"] == "online" for a in agents)

    unknown = rexec("submit", "--pool", "no-such-pool", "tests.tasks:add")
    assert unknown.returncode != 0 and "unknown pool" in unknown.stderr
    not_json = rexec("submit", "--pool", pool_name, "tests.tasks:add", "--args", "[1,")
    assert not_json.returncode == 2 and "--args" in not_json.stderr
    assert len(json.loads(rexec("tasks", "--pool", pool_name, "--json").stdout)) == 3, (
        "nothing stored"
    )
