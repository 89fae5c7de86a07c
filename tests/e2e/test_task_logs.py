"""Task logs stay in the execution plane, end to end: real ``rexec serve`` and ``rexec-agent``.

The agent writes each attempt's log to its own directory; the dispatcher stores only the tail
and the location; ``rexec logs`` reads the whole log from the agent with a grant the API
signed, and says clearly when the agent cannot be reached.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from rexec.dispatcher.db.engine import make_engine
from rexec.dispatcher.db.models import TaskLog
from rexec.schemas import loggrant
from rexec.schemas.api import TaskState
from rexec.schemas.settings import Settings
from rexec.schemas.signing import Signer, generate_private_key
from tests.e2e.conftest import Plane
from tests.support import REPO, free_port, http_ready, python_entry, wait_until

ALLOW = ["--allow", "tests.tasks:*", "--allow", "sh"]
SIGNING_KEY = generate_private_key()


@pytest.fixture
def keyed_plane(settings: Settings, tmp_path: Path) -> Iterator[Plane]:
    """A plane whose dispatcher signs with a key the test knows (to sign grants of its own)."""
    plane = Plane(settings, tmp_path, {"REXEC_SIGNING_KEY": SIGNING_KEY})
    yield plane
    plane.close()


def start_logging_agent(plane: Plane, pool: str) -> tuple[str, int]:
    port = free_port()
    process = plane._start(
        ["rexec-agent", "--pool", pool, "--concurrency", "2", *ALLOW],
        "agent",
        {
            "REXEC_AGENT_TOKEN": plane.client.create_token(pool).secret,
            "REXEC_HEALTH_PORT": str(port),
            "REXEC_AGENT_LOG_URL": f"http://127.0.0.1:{port}",
        },
    )
    wait_until(
        lambda: http_ready(f"http://127.0.0.1:{port}/readyz") or process.popen.poll() is not None,
        30,
        "the agent to be ready",
    )
    assert process.popen.poll() is None, process.output()
    [agent] = plane.client.list_agents(pool=pool)
    return agent.id, port


def rexec(plane: Plane, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*python_entry("rexec.client.cli"), *args],
        env={**plane.env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def stored_logs(settings: Settings, task_id: str) -> list[TaskLog]:
    async def read() -> list[TaskLog]:
        engine = make_engine(settings.database_url)
        try:
            async with engine.connect() as connection:
                rows = await connection.execute(
                    select(TaskLog).where(TaskLog.task_id == task_id).order_by(TaskLog.attempt)
                )
                return [TaskLog(**row._asdict()) for row in rows]
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_logs_stay_on_the_agent_and_rexec_logs_reads_them_through_it(
    keyed_plane: Plane, pool_name: str
) -> None:
    plane, client = keyed_plane, keyed_plane.client
    client.create_pool(pool_name)
    agent_id, port = start_logging_agent(plane, pool_name)
    function = client.submit(pool_name, "tests.tasks:chatty", args=["e2e"])
    command = client.submit(
        pool_name, command=["sh", "-c", "echo cmd-out; echo cmd-err >&2; echo done"]
    )
    retried = client.submit(
        pool_name, "tests.tasks:chatty_fail", args=["twice"], max_attempts=2, retry_backoff=0.05
    )
    done = {t.id: t for t in client.wait([function.id, command.id, retried.id], timeout=60)}
    assert done[function.id].state is TaskState.SUCCEEDED
    assert done[command.id].state is TaskState.SUCCEEDED
    assert (done[retried.id].state, done[retried.id].attempt) == (TaskState.FAILED, 2)

    # On the agent's side: one file per attempt, every stream in it.
    log_dir = plane.task_logs / pool_name
    function_log = (log_dir / function.id / "1.log").read_text()
    for expected in ("stdout out e2e 2", "stderr err e2e", "log    INFO tests.chatty: logged e2e"):
        assert expected in function_log
    assert "stdout sub-out e2e" in function_log and "stderr sub-err e2e" in function_log
    command_log = (log_dir / command.id / "1.log").read_text()
    assert "stdout cmd-out" in command_log and "stderr cmd-err" in command_log
    assert (log_dir / retried.id / "1.log").is_file() and (log_dir / retried.id / "2.log").is_file()

    # The dispatcher keeps the location and the tail only: in the API and in its database.
    view = done[function.id]
    assert view.log_ref == f"dir:{pool_name}/{function.id}/1.log"
    assert "stdout out e2e 2" in view.log_tail and len(view.log_tail.encode()) <= 2048
    rows = stored_logs(plane.settings, retried.id)
    assert [(r.attempt, r.agent_id) for r in rows] == [(1, agent_id), (2, agent_id)]
    assert all("about to fail twice" in r.log_tail for r in rows)
    status = rexec(plane, "status", function.id)
    assert status.returncode == 0 and view.log_ref in status.stdout
    assert "out e2e 2" in status.stdout

    # rexec logs: the whole log, read from the agent.
    logs = rexec(plane, "logs", function.id)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == function_log
    first = rexec(plane, "logs", retried.id, "--attempt", "1")
    assert first.returncode == 0 and first.stdout == (log_dir / retried.id / "1.log").read_text()
    latest = client.log_grant(retried.id)
    assert latest.attempt == 2 and latest.agent_id == agent_id

    # The agent serves only against a genuine, unexpired grant for exactly that attempt.
    url = f"http://127.0.0.1:{port}/logs/{function.id}/1"
    genuine = client.log_grant(function.id)
    assert httpx.get(url, headers=_bearer(genuine.grant)).text == function_log
    assert httpx.get(url).status_code == 401
    forged = loggrant.issue(Signer(generate_private_key()), _claims(function.id, agent_id))
    refused = httpx.get(url, headers=_bearer(forged))
    assert refused.status_code == 403 and "bad signature" in refused.text
    expired = loggrant.issue(
        Signer(SIGNING_KEY), _claims(function.id, agent_id, expires_at=time.time() - 1)
    )
    refused = httpx.get(url, headers=_bearer(expired))
    assert refused.status_code == 403 and "expired" in refused.text
    other = httpx.get(
        f"http://127.0.0.1:{port}/logs/{command.id}/1", headers=_bearer(genuine.grant)
    )
    assert other.status_code == 403 and f"not task {command.id}" in other.text
    tampered = genuine.grant.replace(genuine.grant[:8], genuine.grant[8:16], 1)
    assert httpx.get(url, headers=_bearer(tampered)).status_code == 403

    # The agent gone: the stored tail, and a clear statement of where the log is and why not.
    agent_process = plane.processes[-1]
    agent_process.stop()
    gone = rexec(plane, "logs", function.id)
    assert gone.returncode == 1
    assert gone.stdout == view.log_tail
    message = " ".join(gone.stderr.split())
    assert f"lives on agent {agent_id}" in message
    assert f"at {view.log_ref}" in message
    assert "could not be reached" in message and "ConnectError" in message


def test_rexec_logs_follow_streams_a_running_attempt_to_its_end(
    plane: Plane, pool_name: str
) -> None:
    client = plane.client
    client.create_pool(pool_name)
    start_logging_agent(plane, pool_name)
    task = client.submit(
        pool_name, command=["sh", "-c", "for i in 1 2 3 4 5; do echo tick $i; sleep 0.3; done"]
    )
    wait_until(lambda: client.get(task.id).state is TaskState.RUNNING, 30, "the task to start")
    follow = subprocess.Popen(
        [*python_entry("rexec.client.cli"), "logs", task.id, "--follow"],
        env={**plane.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        out, err = follow.communicate(timeout=30)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0, err
    assert [line.split()[-1] for line in out.splitlines() if "tick" in line] == list("12345")
    assert out.rstrip().endswith("attempt succeeded")
    [done] = client.wait([task.id], timeout=30)
    assert done.state is TaskState.SUCCEEDED


def test_rexec_logs_of_a_silent_success_says_no_log_was_kept(plane: Plane, pool_name: str) -> None:
    client = plane.client
    client.create_pool(pool_name)
    start_logging_agent(plane, pool_name)
    quiet = client.submit(pool_name, "tests.tasks:add", args=[2, 3])
    [done] = client.wait([quiet.id], timeout=60)
    assert (done.state, done.result, done.log_ref) == (TaskState.SUCCEEDED, 5, "")
    logs = rexec(plane, "logs", quiet.id)
    assert logs.returncode == 0 and logs.stdout == ""
    assert f"task {quiet.id} attempt 1 kept no log" in " ".join(logs.stderr.split())
    # Followed while it runs and before it says anything, a log streams from its first line.
    late = client.submit(pool_name, command=["sh", "-c", "sleep 1; echo late words"])
    wait_until(lambda: client.get(late.id).state is TaskState.RUNNING, 30, "the task to start")
    follow = rexec(plane, "logs", late.id, "--follow")
    assert follow.returncode == 0, follow.stderr
    assert "stdout late words" in follow.stdout


def test_an_agent_without_a_health_port_has_no_log_url_and_rexec_logs_says_so(
    plane: Plane, pool_name: str
) -> None:
    client = plane.client
    client.create_pool(pool_name)
    plane.start_agent(pool_name, *ALLOW)
    [done] = client.wait([client.submit(pool_name, "tests.tasks:chatty", args=["x"]).id], 60)
    assert done.state is TaskState.SUCCEEDED and done.log_tail
    result = rexec(plane, "logs", done.id)
    assert result.returncode == 1 and result.stdout == done.log_tail
    message = " ".join(result.stderr.split())
    assert "announced no log URL" in message and "REXEC_HEALTH_PORT" in message
    assert f"at {done.log_ref}" in message


def _bearer(grant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {grant}"}


def _claims(
    task_id: str, agent_id: str, *, expires_at: float | None = None
) -> loggrant.LogGrantClaims:
    return loggrant.LogGrantClaims(
        task_id=task_id,
        attempt=1,
        agent_id=agent_id,
        expires_at=time.time() + 60 if expires_at is None else expires_at,
    )
