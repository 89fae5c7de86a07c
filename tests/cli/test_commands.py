"""Every CLI command against the real API (served in-process), plus the sync client."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import anyio
import pytest

from rexec.client import RexecClient, TaskState
from rexec.client.cli import main
from rexec.dispatcher import statemachine, transitions
from rexec.dispatcher.db.models import Task
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages
from tests.support import free_port

pytestmark = pytest.mark.anyio


class Cli:
    """Runs ``rexec`` in a worker thread (the API runs in the test's event loop)."""

    def __init__(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url = url
        self.capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = await anyio.to_thread.run_sync(main, ["--api-url", self.url, *argv])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    async def json(self, *argv: str) -> Any:
        code, out, err = await self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


async def succeed(rt: Runtime, task_id: str, ok: bool = True) -> None:
    now = time.time()
    done: messages.TaskEvent = (
        messages.Succeeded(task_id=task_id, attempt=1, agent_id="a", at=now, result=42)
        if ok
        else messages.Failed(
            task_id=task_id,
            attempt=1,
            agent_id="a",
            at=now,
            error_type="E",
            message="boom",
            retryable=False,
        )
    )
    for event in (messages.Started(task_id=task_id, attempt=1, agent_id="a", at=now), done):
        async with rt.sessions.begin() as session:
            task = await session.get(Task, task_id)
            assert task is not None
            decision = statemachine.on_event(transitions.snapshot(task), event)
            assert isinstance(decision, statemachine.Transition)
            error = '{"type": "E", "message": "boom"}' if not ok else None
            transitions.apply(session, task, decision, now, result_json="42", error_json=error)
        rt.notify_applied()


async def test_cli_commands(
    api_url: str, runtime: Runtime, pool_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rexec = Cli(api_url, capsys)
    code, out, _ = await rexec("pool", "create", pool_name, "--description", "cli test")
    assert code == 0 and f"created pool {pool_name}" in out
    code, _, err = await rexec("pool", "create", pool_name)
    assert code == 1 and err == f"rexec: error: pool '{pool_name}' already exists\n"

    # submit prints the id only, so scripts can capture it
    code, out, _ = await rexec(
        "submit",
        "--pool",
        pool_name,
        "jobs.math:add",
        "--args",
        "[1, 2]",
        "--kwargs",
        '{"scale": 3}',
        "--timeout",
        "30",
        "--max-attempts",
        "2",
        "--retry-backoff",
        "0.5",
        "--expires-in",
        "600",
        "--key",
        "k1",
    )
    task_id = out.strip()
    assert code == 0 and len(task_id) == 32 and out == task_id + "\n"
    code, out, _ = await rexec("submit", "--pool", pool_name, "jobs.math:add", "--key", "k1")
    assert out.strip() == task_id  # same idempotency key, same task
    code, out, _ = await rexec(
        "submit",
        "--pool",
        pool_name,
        "--final-exit-code",
        "2",
        "--command",
        "--",
        "ls",
        "-l",
        "/tmp",
    )
    command_id = out.strip()
    code, _, err = await rexec("submit", "--pool", "no-such-pool", "a:b")
    assert code == 1 and "rexec: error: unknown pool 'no-such-pool'" in err

    status = await rexec.json("status", task_id)
    assert status["args"] == [1, 2] and status["kwargs"] == {"scale": 3}
    assert status["max_attempts"] == 2 and status["timeout"] == 30
    command = await rexec.json("status", command_id)
    assert command["kind"] == "command" and command["argv"] == ["ls", "-l", "/tmp"]
    assert command["final_exit_codes"] == [2]
    code, out, _ = await rexec("status", task_id)
    assert code == 0 and "jobs.math:add" in out and "queued" in out

    tasks = await rexec.json("tasks", "--pool", pool_name)
    assert [t["id"] for t in tasks] == [command_id, task_id]
    assert await rexec.json("tasks", "--pool", pool_name, "--state", "running") == []
    assert len(await rexec.json("tasks", "--pool", pool_name, "--limit", "1")) == 1
    code, out, _ = await rexec("tasks", "--pool", pool_name)
    assert code == 0 and task_id[:8] in out

    # wait: 0 only if every task succeeded; one line per task
    async with anyio.create_task_group() as tg:
        tg.start_soon(succeed, runtime, task_id)
        code, out, _ = await rexec("wait", task_id, "--timeout", "20")
    assert code == 0 and out.startswith(f"{task_id} succeeded 42")
    await succeed(runtime, command_id, ok=False)
    code, out, _ = await rexec("wait", task_id, command_id, "--timeout", "20")
    assert code == 1
    assert out.splitlines()[1] == f"{command_id} failed E: boom"
    waited = await rexec.json("wait", task_id)
    assert waited[0]["state"] == "succeeded" and waited[0]["result"] == 42

    events = await rexec.json("events", task_id)
    assert [e["to_state"] for e in events] == ["queued", "running", "succeeded"]
    code, out, _ = await rexec("events", task_id)
    assert code == 0 and "succeeded" in out

    code, out, _ = await rexec("submit", "--pool", pool_name, "jobs.math:add")
    queued_id = out.strip()
    code, out, _ = await rexec("cancel", queued_id)
    assert code == 0 and out.strip() == f"cancelled {queued_id}"
    code, _, err = await rexec("cancel", queued_id)
    assert code == 1 and "already cancelled" in err
    code, out, _ = await rexec("wait", queued_id)
    assert code == 1 and "cancelled" in out

    code, out, _ = await rexec("pool", "drain", pool_name)
    assert code == 0 and "draining" in out
    pools = {p["name"]: p for p in await rexec.json("pool", "list")}
    assert pools[pool_name]["draining"] is True
    assert pools[pool_name]["tasks"] == {"succeeded": 1, "failed": 1, "cancelled": 1}
    code, out, _ = await rexec("pool", "resume", pool_name)
    assert code == 0 and "resumed" in out
    code, out, _ = await rexec("pool", "list")
    assert pool_name in out

    code, out, err = await rexec(
        "token", "create", "--pool", pool_name, "--name", "ci", "--expires", "30d"
    )
    secret = out.strip()
    assert code == 0 and secret.startswith("rexec_at_") and out == secret + "\n"
    assert "will not be shown again" in err
    tokens = await rexec.json("token", "list", "--pool", pool_name)
    assert tokens[0]["prefix"] == secret[:12] and tokens[0]["state"] == "active"
    assert tokens[0]["expires_at"] - tokens[0]["created_at"] == pytest.approx(30 * 86400)
    code, out, _ = await rexec("token", "revoke", tokens[0]["id"])
    assert code == 0 and "revoked" in out
    code, out, _ = await rexec("token", "list")
    assert code == 0 and tokens[0]["id"] in out
    created = await rexec.json("token", "create", "--pool", pool_name)
    assert created["secret"].startswith("rexec_at_")
    code, out, err = await rexec("token", "create", "--pool", pool_name, "--quiet")
    assert code == 0 and out.startswith("rexec_at_") and err == ""

    assert await rexec.json("agents", "--pool", pool_name) == []
    code, out, _ = await rexec("agents")
    assert code == 0 and "agents" in out
    code, out, _ = await rexec("top", "--once", "--pool", pool_name)
    assert code == 0 and "pools" in out and "recent tasks" in out


async def test_sync_client(api_url: str, pool_name: str, runtime: Runtime) -> None:
    def scenario() -> None:
        with RexecClient(api_url) as rexec:
            rexec.create_pool(pool_name)
            task = rexec.submit(pool_name, "jobs.math:add", args=[1])
            assert rexec.get(task.id).state is TaskState.QUEUED
            [same] = rexec.wait([task.id], timeout=0.2)
            assert same.state is TaskState.QUEUED
            assert rexec.cancel(task.id).state is TaskState.CANCELLED
            assert [h.to_state for h in rexec.history(task.id)] == ["queued", "cancelled"]
            assert rexec.list_tasks(pool=pool_name)[0].id == task.id
            created = rexec.create_token(pool_name)
            assert rexec.list_tokens(pool=pool_name)[0].prefix == created.secret[:12]
            assert rexec.list_agents(pool=pool_name) == []
            ids = rexec.submit_many([])
            assert ids == []

    await anyio.to_thread.run_sync(scenario)


async def start(rt: Runtime, task_id: str, agent_id: str) -> None:
    event = messages.Started(task_id=task_id, attempt=1, agent_id=agent_id, at=time.time())
    async with rt.sessions.begin() as session:
        task = await session.get(Task, task_id)
        assert task is not None
        decision = statemachine.on_event(transitions.snapshot(task), event)
        assert isinstance(decision, statemachine.Transition)
        transitions.apply(session, task, decision, time.time())


async def test_top_once_shows_depth_running_tasks_and_trouble(
    api_url: str, runtime: Runtime, pool_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rexec = Cli(api_url, capsys)
    assert (await rexec("pool", "create", pool_name))[0] == 0
    ids = [(await rexec("submit", "--pool", pool_name, "jobs.math:add"))[1].strip() for _ in "ab"]
    await start(runtime, ids[0], "agent-x")
    runtime.metrics.requeues.labels("agent_lost").inc(2)

    code, out, err = await rexec("top", "--once", "--pool", pool_name)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"rexec top  {api_url}")
    assert any(line.startswith("throughput: ") for line in lines)
    trouble = next(line for line in lines if line.startswith("since the dispatcher started"))
    assert "requeues 2 (agent_lost 2)" in trouble and "stale events 0" in trouble
    header = next(line for line in lines if "queue depth" in line)
    assert re.split(r"\s{2,}", header.strip())[:6] == [
        "pool",
        "status",
        "agents",
        "queue depth",
        "queued",
        "running",
    ]
    [row] = [line for line in lines if line.strip().startswith(f"{pool_name} ")]
    cells = row.split()
    # The broker's depth is a number (the relay does not run here, so nothing is published).
    assert cells[:6] == [pool_name, "active", "0", "0", "1", "1"]
    assert cells[-2:] == ["-", "-"]  # one snapshot: no rate yet
    running = out[out.index("running tasks") : out.index("recent tasks")]
    assert ids[0] in running and "agent-x" in running and ids[1] not in running


async def test_top_once_says_when_the_api_is_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code = await anyio.to_thread.run_sync(main, ["--api-url", url, "top", "--once"])
    out = capsys.readouterr().out
    assert code == 1
    assert "API error" in out and "unreachable" in out


async def test_submit_names_secrets_and_bad_names_are_refused(
    api_url: str, runtime: Runtime, pool_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rexec = Cli(api_url, capsys)
    code, _, err = await rexec("pool", "create", pool_name)
    assert code == 0, err
    code, out, err = await rexec(
        "submit", "--pool", pool_name, "--secret", "db_password", "--secret", "API_KEY", "m:f"
    )
    assert code == 0, err
    status = await rexec.json("status", out.strip())
    assert status["secrets"] == ["db_password", "API_KEY"]
    code, _, err = await rexec("submit", "--pool", pool_name, "--secret", "db-password", "m:f")
    assert code == 1 and "invalid secret name 'db-password'" in err
