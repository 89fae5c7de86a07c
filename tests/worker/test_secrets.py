"""Secrets reach the task that named them, and only it, on a real agent: through
``rexec.worker.context.secret`` for functions and the environment for commands; a secret that cannot
be resolved fails the attempt before it runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from rexec.schemas import messages
from rexec.schemas.settings import Settings
from rexec.worker.secrets.env import EnvBackend
from tests.worker.harness import Broker, running_agent, task

pytestmark = pytest.mark.anyio

VALUE = "pw-Zq9x!7 'quoted' \"double\""
ALLOW = ("tests.tasks:*", "tests.secret_tasks:*", "sh")


def backend() -> EnvBackend:
    return EnvBackend("REXEC_SECRET_", {"REXEC_SECRET_db": VALUE, "REXEC_SECRET_other": "o-v"})


def with_secrets(message: messages.TaskMessage, *names: str) -> messages.TaskMessage:
    import msgspec

    return msgspec.structs.replace(message, secrets=list(names))


async def test_a_function_task_reads_its_secret_and_returning_it_is_masked(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(
        broker, agent_settings, pool, allow=ALLOW, secrets_backend=backend()
    ) as agent:
        digest = await broker.run(
            pool, with_secrets(task(pool, "tests.secret_tasks:digest", args=["db"]), "db")
        )
        leaked = await broker.run(
            pool, with_secrets(task(pool, "tests.secret_tasks:return_it", args=["db"]), "db")
        )
        unnamed = await broker.run(
            pool, with_secrets(task(pool, "tests.secret_tasks:ask_unnamed"), "db")
        )
    assert isinstance(digest, messages.Succeeded)
    assert digest.result == hashlib.sha256(VALUE.encode()).hexdigest()
    assert isinstance(leaked, messages.Succeeded) and leaked.result == "***"
    assert isinstance(unnamed, messages.Failed) and unnamed.error_type == "SecretNotNamed"
    assert "--secret not_named" in unnamed.message
    assert agent.secrets.lookups == 1  # the second task was served from the cache


async def test_a_command_gets_its_secrets_as_environment_variables_and_no_others(
    broker: Broker, agent_settings: Settings, pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REXEC_SECRET_other", "o-v")  # the agent's own: never a task's
    monkeypatch.setenv("REXEC_SECRETS_CACHE_TTL", "60")
    script = (
        'printf %s "$db" | sha256sum; echo "other=${other:-absent} '
        'env=${REXEC_SECRET_other:-absent} ttl=${REXEC_SECRETS_CACHE_TTL:-absent}"'
    )
    async with running_agent(broker, agent_settings, pool, allow=ALLOW, secrets_backend=backend()):
        command = await broker.run(pool, with_secrets(task(pool, argv=["sh", "-c", script]), "db"))
        function = await broker.run(
            pool, task(pool, "tests.tasks:getenv", args=["REXEC_SECRET_other"])
        )
    assert isinstance(command, messages.Succeeded), command
    output = command.result["output"]
    assert hashlib.sha256(VALUE.encode()).hexdigest() in output
    assert "other=absent env=absent ttl=absent" in output
    assert isinstance(function, messages.Succeeded) and function.result is None


async def test_a_secret_that_cannot_be_resolved_fails_the_attempt_before_it_runs(
    broker: Broker, agent_settings: Settings, pool: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    async with running_agent(broker, agent_settings, pool, allow=ALLOW, secrets_backend=backend()):
        event = await broker.run(
            pool,
            with_secrets(
                task(pool, "tests.tasks:write_pid", args=[str(marker), 0]), "db", "api_key"
            ),
        )
    assert isinstance(event, messages.Failed), event
    assert event.error_type == "SecretNotFound" and event.retryable is False
    assert "'api_key'" in event.message and "env secrets backend" in event.message
    assert "REXEC_SECRET_api_key" in event.message
    assert not marker.exists()
