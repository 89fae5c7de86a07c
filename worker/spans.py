"""The agent's span for each attempt: ``process rexec.pool.<pool>``, a CONSUMER span whose
parent is the W3C context the relay put in the task message's AMQP headers.

Callers check ``rexec.schemas.tracing.active()`` first: with tracing off no span object is made and
no header is parsed. Attributes name the task, never its arguments, results or secrets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from rexec.schemas import messages, names, tracing

from .allow import task_target
from .attempts import Outcome

_ERRORS = (Outcome.FAILED, Outcome.TIMED_OUT)


def start_attempt(
    headers: Mapping[str, Any] | None, task: messages.TaskMessage, agent_id: str
) -> Span:
    queue = names.pool_queue(task.pool)
    attributes: dict[str, str | int] = {
        **tracing.messaging_attributes(queue, "process", f"{task.task_id}:{task.attempt}"),
        "rexec.task.id": task.task_id,
        "rexec.attempt": task.attempt,
        "rexec.agent.id": agent_id,
        "rexec.target": task_target(task),
    }
    return tracing.tracer("rexec.agent").start_span(
        f"process {queue}",
        context=tracing.extract(headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    )


def end_attempt(span: Span, outcome: Outcome | None, error: BaseException | None = None) -> None:
    """Close the span; ``error``: the agent failed handling the delivery.

    Only the error's type is recorded: its text or traceback could quote the task's data.
    """
    if outcome is not None:
        span.set_attribute("rexec.outcome", outcome.value)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, f"agent error: {type(error).__name__}"))
    elif outcome in _ERRORS:
        span.set_status(Status(StatusCode.ERROR, outcome.value))
    span.end()
