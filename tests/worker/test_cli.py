"""``rexec-agent`` as users run it: argument errors, registration refusals, and a real process
that registers, runs tasks and drains on SIGTERM."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from rexec.schemas import messages
from rexec.schemas.names import RedisKeys
from rexec.schemas.settings import Settings
from rexec.worker import cli
from tests.support import SIGNER, Process
from tests.worker.fake_api import FakeApi, serve_fake_api
from tests.worker.harness import Broker, fake_registration, task, until


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """``cli.main`` points the root logger at this test's captured stderr, closed after it:
    later tests in the same process (alembic's logs in tests/cli) would write to a closed
    file and print "--- Logging error ---" on their stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_allow_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--pool", "alpha"])
    assert exit_.value.code == 2
    assert "at least one --allow PATTERN is required" in capsys.readouterr().err


def test_token_is_required(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REXEC_AGENT_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--pool", "alpha", "--allow", "m:*"])
    assert exit_.value.code == 2
    assert "REXEC_AGENT_TOKEN" in capsys.readouterr().err


def test_bad_pool_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--pool", "Not A Pool", "--allow", "m:*"])
    assert "invalid pool name" in capsys.readouterr().err


def test_registration_refusal_exits_non_zero_with_the_server_message(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeApi(status=401, body={"error": "token rx_abc was revoked"})
    with serve_fake_api(api):
        monkeypatch.setenv("REXEC_API_URL", api.url)
        monkeypatch.setenv("REXEC_AGENT_TOKEN", "rx_abc.secret")
        assert cli.main(["--pool", "alpha", "--allow", "m:*"]) == 1
    err = capsys.readouterr().err
    assert "rexec-agent: registration refused" in err
    assert "token rx_abc was revoked" in err
    [(path, headers, _)] = api.requests
    assert path == "/v1/agents/register"
    assert headers["Authorization"] == "Bearer rx_abc.secret"


def test_missing_pool_queue_exits_non_zero(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    agent_settings: Settings,
) -> None:
    api = FakeApi(
        body={
            "agent_id": "a1",
            "pool": "ghost",
            "heartbeat_ttl": 3.0,
            "protocol_version": 1,
            "signing_public_keys": [SIGNER.public_key],
        }
    )
    with serve_fake_api(api):
        monkeypatch.setenv("REXEC_API_URL", api.url)
        monkeypatch.setenv("REXEC_AGENT_TOKEN", "t")
        monkeypatch.setenv("REXEC_AMQP_URL", agent_settings.amqp_url)
        assert cli.main(["--pool", "ghost", "--allow", "m:*"]) == 1
    assert "queue rexec.pool.ghost does not exist" in capsys.readouterr().err


@pytest.mark.anyio
async def test_agent_process_registers_runs_and_drains_on_sigterm(
    broker: Broker,
    agent_settings: Settings,
    pool: str,
    redis_client: redis.Redis,
    keys: RedisKeys,
    tmp_path: Path,
) -> None:
    async with fake_registration(broker, agent_settings, pool, "cli") as (api, agent_id, env):
        health_port = int(env["REXEC_HEALTH_PORT"])
        argv = [sys.executable, "-m", "rexec.worker.cli", "--pool", pool, "--concurrency", "2"]
        argv += ["--allow", "tests.tasks:*", "--drain-timeout", "10"]
        process = Process(argv, env, tmp_path / "agent.log")
        try:
            await until(
                lambda: (
                    redis_client.exists(keys.agent(agent_id)) or process.popen.poll() is not None
                ),
                20,
                "the agent's heartbeat",
            )
            assert process.popen.poll() is None, process.output()
            [(_, _, registration)] = api.requests
            assert registration["pool"] == pool
            assert registration["allow"] == ["tests.tasks:*"]
            assert registration["concurrency"] == 2
            done = await broker.run(pool, task(pool, "tests.tasks:add", args=[40, 2]))
            assert isinstance(done, messages.Succeeded) and done.result == 42
            async with httpx.AsyncClient(timeout=5) as http:  # the health server is up too
                ready = await http.get(f"http://127.0.0.1:{health_port}/readyz")
            assert ready.status_code == 200, ready.text
            running = task(pool, "tests.tasks:sleep", args=[0.5])
            await broker.publish(pool, running)
            await broker.wait_for(running.task_id, messages.Started)
            process.signal(signal.SIGTERM)
            await until(lambda: process.popen.poll() is not None, 20, "the agent to exit")
            assert process.popen.returncode == 0, process.output()
        finally:
            process.stop()
    assert isinstance(await broker.terminal(running.task_id), messages.Succeeded)
    assert any(
        isinstance(e, messages.AgentOffline) and e.agent_id == agent_id for e in broker.events
    )
    # Marked stopped; the dispatcher (absent here) deletes it after the offline event.
    assert json.loads(redis_client.get(keys.agent(agent_id)) or "{}")["state"] == "stopped"
    log = process.log.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line["event"] == "agent ready" and line["agent_id"] == agent_id for line in lines)
    assert any(line["event"].startswith("SIGTERM") for line in lines)
    assert any(
        line["event"] == "health server listening" and line["port"] == health_port for line in lines
    )
