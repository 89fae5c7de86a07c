"""The control queue: the dispatcher stops an attempt the agent runs."""

from __future__ import annotations

from pathlib import Path

import aio_pika
import pytest

from rexec.dispatcher import topology
from rexec.schemas import messages, names
from rexec.schemas.settings import Settings
from tests.worker.harness import Broker, alive, running_agent, task, until

pytestmark = pytest.mark.anyio


async def start_long_task(broker: Broker, pool: str, pidfile: Path) -> messages.TaskMessage:
    message = task(pool, "tests.tasks:write_pid", args=[str(pidfile), 30])
    await broker.publish(pool, message)
    await broker.wait_for(message.task_id, messages.Started)
    await until(pidfile.exists, 5, "the task to start")
    return message


async def test_cancel_stops_a_running_task(
    broker: Broker, agent_settings: Settings, pool: str, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    async with running_agent(broker, agent_settings, pool) as agent:
        message = await start_long_task(broker, pool, pidfile)
        child = int(pidfile.read_text())
        await broker.control(
            agent.agent_id, messages.Control(action="cancel", task_id=message.task_id, attempt=1)
        )
        event = await broker.terminal(message.task_id, within=5)
        assert isinstance(event, messages.Cancelled)
        await until(lambda: not alive(child), 5, "the child to be killed")
        assert isinstance(await broker.run(pool, task(pool)), messages.Succeeded)


async def test_cancel_stops_a_running_command(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool, allow=["sleep"]) as agent:
        message = task(pool, argv=["sleep", "30"])
        await broker.publish(pool, message)
        await broker.wait_for(message.task_id, messages.Started)
        await broker.control(
            agent.agent_id, messages.Control(action="cancel", task_id=message.task_id, attempt=1)
        )
        assert isinstance(await broker.terminal(message.task_id, within=5), messages.Cancelled)


async def test_lease_lost_stops_the_attempt_without_an_event(
    broker: Broker,
    agent_settings: Settings,
    pool: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pidfile = tmp_path / "pid"
    async with running_agent(broker, agent_settings, pool) as agent:
        message = await start_long_task(broker, pool, pidfile)
        child = int(pidfile.read_text())
        await broker.control(
            agent.agent_id,
            messages.Control(action="lease_lost", task_id=message.task_id, attempt=1),
        )
        await until(lambda: not alive(child), 5, "the child to be killed")
        await until(lambda: agent.running == 0, 5, "the attempt to end")
        assert isinstance(await broker.run(pool, task(pool)), messages.Succeeded)
        assert [type(e) for e in broker.of(message.task_id)] == [messages.Started]
        assert agent.stats.leases_lost == 1
    assert any(
        f"lease for task {message.task_id} attempt 1 was taken over" in r.getMessage()
        for r in caplog.records
    )


async def test_malformed_control_is_dropped(
    broker: Broker, agent_settings: Settings, pool: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_agent(broker, agent_settings, pool) as agent:
        exchange = await broker.channel.get_exchange(names.CONTROL_EXCHANGE, ensure=False)
        await exchange.publish(aio_pika.Message(b'{"v": 1, "action": "explode"}'), agent.agent_id)

        await until(
            lambda: any("malformed control" in r.getMessage() for r in caplog.records),
            5,
            "the malformed control message to be logged",
        )
        assert isinstance(await broker.run(pool, task(pool)), messages.Succeeded)
        assert await broker.ready(names.agent_queue(agent.agent_id)) == []


async def test_runs_without_a_control_queue(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool, control=False):
        assert isinstance(await broker.run(pool, task(pool)), messages.Succeeded)


async def test_a_control_queue_declared_after_the_agent_started_is_consumed_once_it_appears(
    broker: Broker,
    agent_settings: Settings,
    pool: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a loaded broker the dispatcher may finish declaring the queue after it answered the
    registration: the agent keeps looking, and cancel requests then reach it."""
    pidfile = tmp_path / "pid"
    caplog.set_level("INFO", logger="rexec.agent")
    async with running_agent(broker, agent_settings, pool, control=False) as agent:
        await until(lambda: "no control queue yet" in caplog.text, 5, "the agent to miss its queue")
        await topology.declare_agent_queue(broker.channel, agent.agent_id)
        await until(lambda: "control queue found" in caplog.text, 15, "the agent to find it")
        message = await start_long_task(broker, pool, pidfile)
        await broker.control(
            agent.agent_id, messages.Control(action="cancel", task_id=message.task_id, attempt=1)
        )
        assert isinstance(await broker.terminal(message.task_id, within=5), messages.Cancelled)
