"""One task is one trace across the API, the dispatcher and the agent processes, exported
over OTLP/HTTP to a real receiver in this test."""

from __future__ import annotations

import pytest

from rexec.schemas.api import TaskState
from tests.e2e.conftest import Plane
from tests.otlp import OtlpReceiver, ReceivedSpan
from tests.support import wait_until


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_retried_task_is_one_trace_across_three_processes(
    traced_plane: Plane, receiver: OtlpReceiver, pool_name: str
) -> None:
    plane = traced_plane
    plane.client.create_pool(pool_name)
    plane.start_agent(pool_name, "--allow", "tests.tasks:*")
    task = plane.client.submit(pool_name, "tests.tasks:fail", max_attempts=2, retry_backoff=0.05)
    [done] = plane.client.wait([task.id], timeout=60)
    assert (done.state, done.attempt) == (TaskState.FAILED, 2)

    def create_span() -> ReceivedSpan | None:
        return next(
            (
                s
                for s in receiver.spans
                if s.attributes.get("rexec.task.id") == task.id and s.name.startswith("create")
            ),
            None,
        )

    create = wait_until(create_span, 20, "the create span")
    expected = {"create", "send", "process", "record"}

    def spans() -> list[ReceivedSpan]:
        found = receiver.of_trace(create.trace_id)
        names = [s.name.split()[0] for s in found]
        return (
            found
            if names.count("send") == 2
            and names.count("process") == 2
            and names.count("record") >= 4
            else []
        )

    trace = wait_until(spans, 20, "every span of the task's trace")
    by_id = {s.span_id: s for s in trace}
    assert {s.name.split()[0] for s in trace} >= expected
    for span in trace:
        kind = span.name.split()[0]
        if kind == "send":
            assert span.parent_id == create.span_id and span.service == "rexec-dispatcher"
        elif kind == "process":
            parent = by_id[span.parent_id]
            assert parent.name.startswith("send") and span.service == "rexec-agent"
            assert str(parent.attributes["rexec.attempt"]) == str(span.attributes["rexec.attempt"])
            assert "args" not in str(span.attributes)
        elif kind == "record":
            assert span.parent_id == create.span_id
    attempts = sorted(
        str(s.attributes["rexec.attempt"]) for s in trace if s.name.startswith("process")
    )
    assert attempts == ["1", "2"]
    print_tree(trace)


def print_tree(spans: list[ReceivedSpan]) -> None:
    """The trace as service / span / parent, indented by depth (shown with ``pytest -s``)."""
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        children.setdefault(span.parent_id if span.parent_id in by_id else "", []).append(span)

    def walk(parent: str, depth: int) -> None:
        for span in children.get(parent, []):
            attempt = span.attributes.get("rexec.attempt", "")
            print(f"{'  ' * depth}{span.service:17} {span.name:28} attempt={attempt}")
            walk(span.span_id, depth + 1)

    walk("", 0)
