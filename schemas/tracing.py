"""OpenTelemetry set-up and W3C trace context in AMQP headers, for both planes.

Tracing is configured only by the standard ``OTEL_*`` variables. With no OTLP endpoint set
(or ``OTEL_SDK_DISABLED=true``) nothing is installed: the API's no-op tracer costs nothing,
and no context is injected into messages.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

_enabled: bool | None = None
_provider: TracerProvider | None = None

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def enabled() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return any(os.environ.get(name) for name in _ENDPOINT_VARIABLES)


def active() -> bool:
    """Whether this process exports spans (decided once, by ``configure``)."""
    return bool(_enabled)


def configure(service_name: str, exporter: SpanExporter | None = None) -> None:
    """Install an OTLP/HTTP exporter when the environment asks for one.

    With ``exporter`` (an in-memory or console one, say), spans go there whatever the
    environment says, through a provider of this module's own: the process-wide provider,
    which OpenTelemetry lets a process set only once, is left alone.
    """
    global _enabled, _provider
    _enabled = exporter is not None or enabled()
    _provider = None
    if not _enabled:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME", service_name)
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    else:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider


def shutdown() -> None:
    """Flush spans still buffered and stop tracing (the SDK's provider has ``shutdown``; the
    no-op one has not)."""
    global _enabled, _provider
    provider: Any = _provider or trace.get_tracer_provider()
    _enabled, _provider = False, None
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    if _provider is not None:
        return _provider.get_tracer(name)
    return trace.get_tracer(name)


def inject(headers: MutableMapping[str, Any], context: Context | None = None) -> None:
    """Write ``traceparent`` (and ``tracestate``) of the current or given context."""
    propagate.inject(headers, context=context)


def extract(headers: Mapping[str, Any] | None) -> Context:
    carrier = {
        k: v.decode() if isinstance(v, bytes) else str(v) for k, v in (headers or {}).items()
    }
    return propagate.extract(carrier)


def current_traceparent() -> str | None:
    """The current span's context as a ``traceparent`` string, to store with a task."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


def context_from_traceparent(traceparent: str | None) -> Context | None:
    return propagate.extract({"traceparent": traceparent}) if traceparent else None


def messaging_attributes(destination: str, operation: str, message_id: str) -> dict[str, str]:
    """OpenTelemetry messaging semantic conventions for RabbitMQ."""
    return {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": destination,
        "messaging.operation.type": operation,
        "messaging.message.id": message_id,
    }


def task_created(task_id: str, pool: str, target: str) -> str | None:
    """Open and close the task's ``create`` span; return its context to store with the task.

    Every later span of the task (each attempt's publish, the agent's processing, the
    recording of results) is parented to it, so one task is one trace. None when tracing is off.
    """
    if not _enabled:
        return None
    attributes = messaging_attributes("rexec.tasks", "create", task_id)
    attributes.update({"rexec.task.id": task_id, "rexec.pool": pool, "rexec.target": target})
    with tracer("rexec.dispatcher").start_as_current_span(
        f"create {pool}", kind=SpanKind.PRODUCER, attributes=attributes
    ):
        return current_traceparent()


@contextmanager
def parent_from(headers: Mapping[str, Any] | None) -> Iterator[None]:
    """Make the caller's W3C context (e.g. an HTTP request's) the parent of spans inside."""
    if not _enabled:
        yield
        return
    token = otel_context.attach(extract(headers))
    try:
        yield
    finally:
        otel_context.detach(token)
