"""Nothing an attempt started outlives it: not when its agent is killed with -9 (alone, as the
OOM killer does), not when it is stopped (timeout, cancel), not when its processes left the
agent's process group (setsid) or their parent (double fork)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from rexec.schemas import messages
from rexec.schemas.names import RedisKeys
from rexec.schemas.settings import Settings
from tests.support import Process
from tests.worker import spawner
from tests.worker.harness import Broker, fake_registration, running_agent, task, until

pytestmark = pytest.mark.anyio

GONE_WITHIN = 20.0
"""The grace (a few seconds) plus the time init takes to reap what it inherited."""


def gone(pid: int) -> bool:
    """No such process any more: a zombie still holds its pid, so it is not gone yet."""
    return not os.path.exists(f"/proc/{pid}")


@contextlib.contextmanager
def killed_at_exit(pids: list[int]) -> Iterator[list[int]]:
    """Whatever the test recorded in ``pids`` is SIGKILLed at the end, pass or fail."""
    try:
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def recorded(pidfile: Path) -> list[int]:
    found = await until(lambda: spawner.pids(str(pidfile)), 30, f"the pids in {pidfile}")
    assert found is not None
    return found


@contextlib.asynccontextmanager
async def agent_process(
    broker: Broker, settings: Settings, pool: str, redis_client: redis.Redis, log: Path
) -> AsyncIterator[Process]:
    """A real ``rexec-agent`` process (registered with a fake API), stopped at the end."""
    async with fake_registration(broker, settings, pool, "orph") as (_, agent_id, env):
        argv = [sys.executable, "-m", "rexec.worker.cli", "--pool", pool, "--concurrency", "1"]
        argv += ["--allow", "tests.worker.spawner:*", "--allow", sys.executable]
        process = Process(argv, env, log)
        try:
            key = RedisKeys(settings.redis_prefix).agent(agent_id)
            await until(
                lambda: redis_client.exists(key) or process.popen.poll() is not None,
                30,
                "the agent's heartbeat",
            )
            assert process.popen.poll() is None, process.output()
            yield process
        finally:
            process.stop()


@pytest.mark.parametrize("kind", ["command", "function"])
async def test_kill_9_of_the_agent_alone_kills_everything_its_attempt_started(
    kind: str,
    broker: Broker,
    agent_settings: Settings,
    pool: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "pids"
    if kind == "command":
        message = task(pool, argv=[sys.executable, "-m", "tests.worker.spawner", str(pidfile)])
    else:
        message = task(pool, "tests.worker.spawner:spawn", args=[str(pidfile)])
    with killed_at_exit([]) as started:
        async with agent_process(
            broker, agent_settings, pool, redis_client, tmp_path / "agent.log"
        ) as agent:
            await broker.publish(pool, message)
            started += await recorded(pidfile)
            os.kill(agent.pid, signal.SIGKILL)  # the agent's process only, not its group
            await until(
                lambda: all(gone(p) for p in started),
                GONE_WITHIN,
                f"every process the {kind} task started ({started}) to be gone",
            )


@pytest.mark.parametrize("stop", ["timeout", "cancel"])
async def test_a_stopped_command_gets_sigterm_then_leaves_nothing_behind(
    stop: str, broker: Broker, agent_settings: Settings, pool: str, tmp_path: Path
) -> None:
    pidfile, trapped = tmp_path / "pids", tmp_path / "trapped"
    script = f"""
        trap 'echo term >> {trapped}; exit 0' TERM
        echo $$ >> {pidfile}
        setsid sleep 300 & echo $! >> {pidfile}
        sleep 300 & echo $! >> {pidfile}
        echo ready >> {pidfile}
        while :; do sleep 0.05; done
    """
    timeout = 3.0 if stop == "timeout" else None
    message = task(pool, argv=["sh", "-c", script], timeout=timeout)
    with killed_at_exit([]) as started:
        async with running_agent(broker, agent_settings, pool, allow=["sh"]) as agent:
            await broker.publish(pool, message)
            started += await recorded(pidfile)
            if stop == "cancel":
                await broker.control(
                    agent.agent_id,
                    messages.Control(action="cancel", task_id=message.task_id, attempt=1),
                )
            event = await broker.terminal(message.task_id, within=20)
            expected = messages.TimedOut if stop == "timeout" else messages.Cancelled
            assert isinstance(event, expected), event
            # The attempt ends once its processes are gone, not before.
            assert [p for p in started if not gone(p)] == []
            assert trapped.read_text() == "term\n", "the command saw SIGTERM before any SIGKILL"
