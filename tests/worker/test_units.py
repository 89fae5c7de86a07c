"""Pure pieces of the agent, without services: the child's runner, allow patterns, batching."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from rexec.schemas import messages
from rexec.worker import protocol
from rexec.worker.allow import allowed, preload_modules, task_target
from rexec.worker.child import Runner
from rexec.worker.events import EventPublisher
from rexec.worker.leases import OwnClaims

pytestmark = pytest.mark.anyio


def run(target: str, *args: object, limit: int = 1000) -> protocol.Outcome:
    return Runner(limit).run(protocol.Call(target=target, args=list(args)))


def test_runner_results_and_errors() -> None:
    ok = run("tests.tasks:add", 1, 2)
    assert ok.ok and bytes(ok.result) == b"3"
    assert bytes(run("tests.tasks:async_add", 2, 2).result) == b"4"
    failed = run("tests.tasks:fail", "nope")
    assert (failed.ok, failed.error_type, failed.message, failed.retryable) == (
        False,
        "RuntimeError",
        "nope",
        True,
    )
    assert run("tests.tasks:big_result", 2000).error_type == "ResultTooLarge"
    assert run("tests.tasks:unserialisable").error_type == "ResultNotSerializable"
    assert run("tests.tasks:add", 1).error_type == "TypeError"
    assert run("nope:nothing").error_type == "TargetNotFound"


def test_runner_caches_imports() -> None:
    runner = Runner(1000)
    first = runner.resolve("tests.tasks:add")
    assert runner.resolve("tests.tasks:add") is first


def test_frames_round_trip() -> None:
    data = protocol.frame(protocol.Call(target="m:f", args=[1], kwargs={"a": None}))
    size = protocol.frame_length(data[: protocol.HEADER_BYTES])
    assert size == len(data) - protocol.HEADER_BYTES
    call = protocol.call_decoder.decode(data[protocol.HEADER_BYTES :])
    assert call == protocol.Call(target="m:f", args=[1], kwargs={"a": None})


def test_allow_patterns() -> None:
    function = messages.TaskMessage(
        task_id="t", attempt=1, pool="p", kind="function", target="app.jobs:send"
    )
    command = messages.TaskMessage(
        task_id="t", attempt=1, pool="p", kind="command", target="ls", argv=["ls", "-l"]
    )
    assert task_target(function) == "app.jobs:send" and task_target(command) == "ls"
    assert allowed("app.jobs:send", ["app.*"])
    assert allowed("ls", ["echo", "ls"])
    assert not allowed("app.jobs:send", ["app.jobs:receive", "other.*"])
    assert not allowed("App.jobs:send", ["app.*"]), "matching is case-sensitive"
    assert not allowed("x", [])


class FlakyExchange:
    """Fails the first ``failures`` publishes, then records batches."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.batches: list[messages.EventBatch] = []
        self.gate = anyio.Event()

    async def publish(self, message: object, routing_key: str, **_: object) -> None:
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker unreachable")
        body = message.body  # type: ignore[attr-defined]
        self.batches.append(messages.decode_events(body))


def event(i: int) -> messages.Started:
    return messages.Started(task_id=f"t{i}", attempt=1, agent_id="a", at=0.0)


async def test_publisher_batches_and_never_drops() -> None:
    exchange = FlakyExchange(failures=2)
    publisher = EventPublisher(exchange, max_batch=50, max_in_flight=2)  # type: ignore[arg-type]
    confirmed: list[int] = []

    async def emit(i: int) -> None:
        await publisher.emit(event(i))
        confirmed.append(i)

    async with anyio.create_task_group() as tg:
        tg.start_soon(publisher.run)
        async with anyio.create_task_group() as emitters:
            for i in range(200):
                emitters.start_soon(emit, i)
            await anyio.wait_all_tasks_blocked()
            assert confirmed == [], "nothing returns before the broker confirmed it"
            exchange.gate.set()
        publisher.close()
    sent = [
        e.task_id
        for batch in exchange.batches
        for e in batch.events
        if isinstance(e, messages.Started)
    ]
    assert sorted(sent) == sorted(f"t{i}" for i in range(200))
    assert len(sent) == len(set(sent))
    assert sorted(confirmed) == list(range(200))
    assert len(exchange.batches) <= 200 // 50 + 2
    assert max(len(b.events) for b in exchange.batches) <= 50


def test_outcome_result_is_raw_json() -> None:
    outcome = protocol.success(b'{"a":[1,2]}')
    event = messages.Succeeded(task_id="t", attempt=1, agent_id="a", at=0.0, result=outcome.result)
    decoded = messages.decode_events(messages.encode(messages.EventBatch(events=[event])))
    assert decoded.events[0] == msgspec.convert(
        {
            "type": "succeeded",
            "task_id": "t",
            "attempt": 1,
            "agent_id": "a",
            "at": 0.0,
            "result": {"a": [1, 2]},
        },
        messages.Succeeded,
    )


def test_own_claims_tell_a_late_reply_from_a_duplicate() -> None:
    claims = OwnClaims(remember_for=60, limit=2)
    a, b, c = ("a", 1), ("b", 1), ("c", 1)
    assert claims.is_lost_reply(a, held=set())
    assert not claims.is_lost_reply(a, held={a}), "running here: a duplicate"
    claims.claiming(a)
    assert not claims.is_lost_reply(a, held=set()), "another copy is being claimed here"
    claims.claimed(a)
    claims.finished(a)
    assert not claims.is_lost_reply(a, held=set()), "finished here: a late duplicate"
    claims.finished(b)
    claims.finished(c)  # past the limit: the oldest is forgotten
    assert claims.is_lost_reply(a, held=set()) and not claims.is_lost_reply(c, held=set())
    old = OwnClaims(remember_for=-1.0)  # everything is older than that
    old.finished(a)
    old.finished(b)
    assert old.is_lost_reply(a, held=set())


def test_preload_modules_are_those_the_patterns_name_outright() -> None:
    patterns = ["app.jobs:*", "app.jobs:resize", "app.*:run", "lib.mod:f?", "sh", "tool*", ":x"]
    assert preload_modules(patterns) == ["app.jobs", "lib.mod"]
