"""Commands, timeouts and crashes: the agent kills what it must and its pool keeps working."""

from __future__ import annotations

from pathlib import Path

import pytest

from rexec.schemas import messages
from rexec.schemas.settings import Settings
from rexec.worker.command import run_command
from tests.worker.harness import Broker, alive, running_agent, task, until

pytestmark = pytest.mark.anyio


async def test_command_succeeds(broker: Broker, agent_settings: Settings, pool: str) -> None:
    async with running_agent(broker, agent_settings, pool, allow=["echo"]):
        event = await broker.run(pool, task(pool, argv=["echo", "hello", "world"]))
        assert isinstance(event, messages.Succeeded), event
        assert event.result == {"exit_code": 0, "output": "hello world\n"}


async def test_command_nonzero_exit_fails(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool, allow=["sh"]):
        script = "echo to-stdout; echo to-stderr >&2; exit 3"
        event = await broker.run(pool, task(pool, argv=["sh", "-c", script]))
        assert isinstance(event, messages.Failed), event
        assert (event.error_type, event.message, event.retryable) == (
            "CommandFailed",
            "exit code 3",
            True,
        )
        assert "to-stdout" in event.traceback and "to-stderr" in event.traceback


async def test_command_output_keeps_the_tail(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool, allow=["sh"]):
        script = "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done"
        event = await broker.run(pool, task(pool, argv=["sh", "-c", script]))
        assert isinstance(event, messages.Succeeded)
        output = event.result["output"]
        assert len(output) <= 4096
        assert output.endswith("line-1999\n")


async def test_missing_program_is_not_found(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool, allow=["rexec-no-such-*"]):
        event = await broker.run(pool, task(pool, argv=["rexec-no-such-program"]))
        assert isinstance(event, messages.Failed)
        assert (event.error_type, event.retryable) == ("TargetNotFound", False)


async def test_command_timeout_kills_the_process_group(
    broker: Broker, agent_settings: Settings, pool: str, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    async with running_agent(broker, agent_settings, pool, allow=["sh"]):
        # The shell starts a grandchild; killing the group must stop both.
        script = f"sleep 30 & echo $! > {pidfile}; wait"
        message = task(pool, argv=["sh", "-c", script], timeout=0.5)
        event = await broker.run(pool, message)
        assert isinstance(event, messages.TimedOut), event
        assert event.timeout == 0.5
        grandchild = int(pidfile.read_text())
        await until(lambda: not alive(grandchild), 5, "the grandchild to die")


async def test_timeout_kills_the_child_and_the_pool_recovers(
    broker: Broker, agent_settings: Settings, pool: str, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    async with running_agent(broker, agent_settings, pool, concurrency=1):
        message = task(pool, "tests.tasks:write_pid", args=[str(pidfile), 30], timeout=0.5)
        event = await broker.run(pool, message)
        assert isinstance(event, messages.TimedOut), event
        assert event.timeout == 0.5
        child = int(pidfile.read_text())
        await until(lambda: not alive(child), 5, "the timed-out child to die")
        after = await broker.run(pool, task(pool, "tests.tasks:add", args=[20, 22]))
        assert isinstance(after, messages.Succeeded)
        assert after.result == 42


async def test_crashed_child_fails_retryable_and_is_replaced(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool, concurrency=1):
        event = await broker.run(pool, task(pool, "tests.tasks:crash"))
        assert isinstance(event, messages.Failed), event
        assert (event.error_type, event.retryable) == ("WorkerCrashed", True)
        assert "SIGKILL" in event.message
        after = await broker.run(pool, task(pool, "tests.tasks:add", args=[1, 1]))
        assert isinstance(after, messages.Succeeded)


async def test_children_persist_across_tasks(
    broker: Broker, agent_settings: Settings, pool: str, tmp_path: Path
) -> None:
    async with running_agent(broker, agent_settings, pool, concurrency=1):
        pids = set()
        for i in range(3):
            event = await broker.run(
                pool, task(pool, "tests.tasks:write_pid", args=[str(tmp_path / f"p{i}"), 0])
            )
            assert isinstance(event, messages.Succeeded)
            pids.add(event.result)
        assert len(pids) == 1, "one persistent child ran every task"


async def test_children_preload_the_allowed_modules(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    """Modules the allow patterns name are imported when a child starts, as Celery's workers
    do; one that cannot be imported is left for its tasks to report."""
    allow = ["tests.tasks:*", "tests.preloaded:*", "tests.not_a_module:*", "tests.*:x"]
    async with running_agent(broker, agent_settings, pool, allow=allow, concurrency=1):
        event = await broker.run(pool, task(pool, "tests.tasks:imported", args=["tests.preloaded"]))
        assert isinstance(event, messages.Succeeded) and event.result is True
        missing = await broker.run(pool, task(pool, "tests.not_a_module:f"))
        assert isinstance(missing, messages.Failed) and missing.error_type == "TargetNotFound"
    async with running_agent(broker, agent_settings, pool, concurrency=1):
        event = await broker.run(pool, task(pool, "tests.tasks:imported", args=["tests.preloaded"]))
        assert isinstance(event, messages.Succeeded) and event.result is False


async def test_tasks_do_not_see_the_agents_credentials(
    broker: Broker, agent_settings: Settings, pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REXEC_AGENT_TOKEN", "agent-secret")
    monkeypatch.setenv("REXEC_TEST_VISIBLE", "customer-value")
    async with running_agent(broker, agent_settings, pool, allow=["tests.tasks:*", "sh"]):
        hidden = await broker.run(
            pool, task(pool, "tests.tasks:getenv", args=["REXEC_AGENT_TOKEN"])
        )
        assert isinstance(hidden, messages.Succeeded) and hidden.result is None
        shown = await broker.run(
            pool, task(pool, "tests.tasks:getenv", args=["REXEC_TEST_VISIBLE"])
        )
        assert isinstance(shown, messages.Succeeded) and shown.result == "customer-value"
        command = task(pool, argv=["sh", "-c", 'echo "[$REXEC_AGENT_TOKEN]"'])
        printed = await broker.run(pool, command)
        assert isinstance(printed, messages.Succeeded) and printed.result["output"] == "[]\n"


async def test_a_command_with_a_nul_byte_fails_for_good(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    """No exec can take it ("embedded null byte"): not retried. The dispatcher refuses such
    a command at submission; this is a task from elsewhere, or from before that."""
    async with running_agent(broker, agent_settings, pool, allow=["echo"]):
        event = await broker.run(pool, task(pool, argv=["echo", "a\x00b"]))
        assert isinstance(event, messages.Failed), event
        assert (event.error_type, event.retryable) == ("InvalidCommand", False)
        assert event.message == "cannot run command 'echo': embedded null byte"


async def test_a_file_that_is_no_executable_fails_for_good(tmp_path: Path) -> None:
    script = tmp_path / "not-a-program"
    script.write_text("no shebang, no binary\n")
    script.chmod(0o755)
    outcome = await run_command([str(script)])
    assert (outcome.ok, outcome.error_type, outcome.retryable) == (False, "InvalidCommand", False)
    assert "Exec format error" in outcome.message
