"""Function tasks run in persistent child processes and report what happened."""

from __future__ import annotations

import pytest

from rexec.schemas import messages
from rexec.schemas.settings import Settings
from tests.worker.harness import Broker, running_agent, task

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("target", ["tests.tasks:add", "tests.tasks:async_add"])
async def test_function_succeeds(
    broker: Broker, agent_settings: Settings, pool: str, target: str
) -> None:
    async with running_agent(broker, agent_settings, pool) as agent:
        message = task(pool, target, args=[2, 3])
        event = await broker.run(pool, message)
        assert isinstance(event, messages.Succeeded), event
        assert event.result == 5
        assert event.agent_id == agent.agent_id
        assert event.attempt == 1
        kinds = [type(e) for e in broker.of(message.task_id)]
        assert kinds == [messages.Started, messages.Succeeded]


async def test_kwargs_and_json_values(broker: Broker, agent_settings: Settings, pool: str) -> None:
    async with running_agent(broker, agent_settings, pool):
        message = task(pool, "tests.tasks:echo", args=[1, "a", None], kwargs={"k": [1.5, True]})
        event = await broker.run(pool, message)
        assert isinstance(event, messages.Succeeded)
        assert event.result == {"args": [1, "a", None], "kwargs": {"k": [1.5, True]}}


async def test_exception_fails_retryable_with_traceback(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool):
        event = await broker.run(pool, task(pool, "tests.tasks:fail", args=["kaput"]))
        assert isinstance(event, messages.Failed)
        assert event.error_type == "RuntimeError"
        assert event.message == "kaput"
        assert event.retryable is True
        assert "tests/tasks.py" in event.traceback
        assert "raise RuntimeError(message)" in event.traceback
        assert "worker/child.py" not in event.traceback


async def test_non_retryable_exception_fails_for_good(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    async with running_agent(broker, agent_settings, pool):
        event = await broker.run(pool, task(pool, "tests.tasks:refuse", args=["seen already"]))
        assert isinstance(event, messages.Failed)
        assert (event.error_type, event.message) == ("Refused", "seen already")
        assert event.retryable is False


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ("tests.no_such_module:add", "cannot import module 'tests.no_such_module'"),
        ("tests.tasks:no_such_function", "has no attribute 'no_such_function'"),
        ("tests.tasks:NOT_CALLABLE", "is not callable"),
        ("tests.tasks", "not of the form 'module:function'"),
    ],
)
async def test_unknown_target_is_not_found(
    broker: Broker, agent_settings: Settings, pool: str, target: str, needle: str
) -> None:
    async with running_agent(broker, agent_settings, pool, allow=["tests.*"]):
        event = await broker.run(pool, task(pool, target))
        assert isinstance(event, messages.Failed)
        assert event.error_type == "TargetNotFound"
        assert event.retryable is False
        assert needle in event.message


async def test_result_limits(broker: Broker, agent_settings: Settings, pool: str) -> None:
    async with running_agent(broker, agent_settings, pool) as agent:
        limit = agent.settings.max_result_bytes
        big = await broker.run(pool, task(pool, "tests.tasks:big_result", args=[limit + 10]))
        assert isinstance(big, messages.Failed)
        assert (big.error_type, big.retryable) == ("ResultTooLarge", False)
        assert str(limit) in big.message
        odd = await broker.run(pool, task(pool, "tests.tasks:unserialisable"))
        assert isinstance(odd, messages.Failed)
        assert (odd.error_type, odd.retryable) == ("ResultNotSerializable", False)
        fits = await broker.run(pool, task(pool, "tests.tasks:big_result", args=[limit - 100]))
        assert isinstance(fits, messages.Succeeded)
        assert len(fits.result) == limit - 100
