"""The agent's span of each attempt: a child of the relay's context from the AMQP headers,
with the task's names and outcome but none of its data; and nothing at all with tracing off."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from rexec.schemas import messages, tracing
from rexec.schemas.settings import Settings
from rexec.worker import spans
from tests.worker.harness import Broker, running_agent, task, until

pytestmark = pytest.mark.anyio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SECRET = "s3cr3t-hunter2"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure("rexec-agent", exporter=exporter)
    assert tracing.active()
    try:
        yield exporter
    finally:
        tracing.shutdown()
    assert not tracing.active()


def headers(span_id: str = PARENT_ID) -> dict[str, str]:
    return {"traceparent": f"00-{TRACE_ID}-{span_id}-01", "tracestate": "vendor=value"}


async def test_attempt_span_continues_the_relays_trace(
    broker: Broker, agent_settings: Settings, pool: str, exporter: InMemorySpanExporter
) -> None:
    ok = task(pool, "tests.tasks:echo", args=[SECRET], kwargs={"password": SECRET})
    bad = task(pool, "tests.tasks:fail", args=[SECRET])
    async with running_agent(broker, agent_settings, pool) as agent:
        await broker.publish(pool, ok, headers())
        assert isinstance(await broker.terminal(ok.task_id), messages.Succeeded)
        await broker.publish(pool, bad, headers("00f067aa0ba902b8"))
        assert isinstance(await broker.terminal(bad.task_id), messages.Failed)
        await until(lambda: agent.stats.finished == 2, 5, "both attempts over")
    tracing.shutdown()  # flushes the batch processor into the exporter
    finished = {
        span.attributes["rexec.task.id"]: span
        for span in exporter.get_finished_spans()
        if span.attributes is not None and span.name == f"process rexec.pool.{pool}"
    }
    span = finished[ok.task_id]
    assert span.kind is SpanKind.CONSUMER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
    assert span.parent.is_remote
    assert dict(span.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": f"rexec.pool.{pool}",
        "messaging.operation.type": "process",
        "messaging.message.id": f"{ok.task_id}:1",
        "rexec.task.id": ok.task_id,
        "rexec.attempt": 1,
        "rexec.agent.id": agent.agent_id,
        "rexec.target": "tests.tasks:echo",
        "rexec.outcome": "succeeded",
    }
    assert span.status.status_code is StatusCode.UNSET
    assert span.start_time is not None and span.end_time is not None

    failed = finished[bad.task_id]
    assert format(failed.context.trace_id, "032x") == TRACE_ID
    assert failed.parent is not None and format(failed.parent.span_id, "016x") == "00f067aa0ba902b8"
    assert (failed.attributes or {})["rexec.outcome"] == "failed"
    assert failed.status.status_code is StatusCode.ERROR
    for each in (span, failed):
        assert SECRET not in repr(dict(each.attributes or {}))
        assert SECRET not in (each.status.description or "")
        assert not any(SECRET in repr(event.attributes) for event in each.events)


def no_span(*args: object, **kwargs: object) -> ReadableSpan:
    raise AssertionError("a span was started with tracing off")


def no_extract(*args: object, **kwargs: object) -> object:
    raise AssertionError("headers were parsed with tracing off")


async def test_each_task_of_a_batch_continues_its_own_trace(
    broker: Broker, agent_settings: Settings, pool: str, exporter: InMemorySpanExporter
) -> None:
    """A batch carries one traceparent per task in its body, not one in its headers."""
    tasks = [task(pool), task(pool)]
    parents = ["00f067aa0ba902c1", "00f067aa0ba902c2"]
    batch = messages.TaskBatch(tasks=tasks, traceparents=[f"00-{TRACE_ID}-{p}-01" for p in parents])
    async with running_agent(broker, agent_settings, pool) as agent:
        await broker.publish(pool, batch)
        for one in tasks:
            assert isinstance(await broker.terminal(one.task_id), messages.Succeeded)
        await until(lambda: agent.stats.finished == 2, 5, "both attempts over")
    tracing.shutdown()
    parent_of = {
        (span.attributes or {})["rexec.task.id"]: span.parent
        for span in exporter.get_finished_spans()
        if span.name == f"process rexec.pool.{pool}"
    }
    for one, parent_id in zip(tasks, parents, strict=True):
        parent = parent_of[one.task_id]
        assert parent is not None and format(parent.span_id, "016x") == parent_id
        assert format(parent.trace_id, "032x") == TRACE_ID


async def test_tracing_off_costs_no_span_and_no_header_parsing(
    broker: Broker, agent_settings: Settings, pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not tracing.active()
    monkeypatch.setattr(spans, "start_attempt", no_span)
    monkeypatch.setattr(tracing, "extract", no_extract)
    async with running_agent(broker, agent_settings, pool):
        message = task(pool)
        await broker.publish(pool, message, headers())
        assert isinstance(await broker.terminal(message.task_id), messages.Succeeded)
