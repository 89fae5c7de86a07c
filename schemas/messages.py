"""Versioned wire messages exchanged over RabbitMQ.

Every body is JSON so an operator can read it in the management UI. Each message carries a
protocol version ``v``; decoders check it before decoding the body strictly, so an unknown
version is refused with a message that says so instead of a confusing field error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

PROTOCOL_VERSION = 1
"""The wire's major version: messages carry it as ``v``; a different major is refused."""
SUPPORTED_VERSIONS = frozenset({1})
PROTOCOL_MINOR = 2
"""Minor versions add optional fields (omitted when unused), headers and message kinds: 1.1
signs tasks and issues scoped credentials; 1.2 carries several tasks in one message
(``TaskBatch``) and lets an agent hand unstarted tasks back (``Returned``). Agents one minor
version behind keep working: the relay sends batches only to pools whose agents all speak 1.2."""
BATCHES_FROM_MINOR = 2
OLDEST_AGENT_MINOR = PROTOCOL_MINOR - 1


def protocol_name(major: int, minor: int) -> str:
    return f"{major}.{minor}"


TaskKind = Literal["function", "command"]


class _Header(msgspec.Struct):
    v: int


def _version() -> int:
    return PROTOCOL_VERSION


class TaskMessage(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """One attempt of a task, published by the dispatcher to its pool's queue.

    Encoded without default values, so a task that names no secrets decodes on agents that
    predate ``secrets``. ``v`` has a factory, not a plain default, so it is always encoded.
    """

    v: int = msgspec.field(default_factory=_version)
    task_id: str
    attempt: int
    pool: str
    kind: TaskKind
    target: str
    """``module:function`` for a function task, the program (argv[0]) for a command task."""
    argv: list[str] = []
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    timeout: float | None = None
    """Seconds the agent lets the attempt run before it kills it."""
    expires_at: float | None = None
    """Epoch seconds after which the task must not start (schedule-to-start expiry)."""
    submitted_at: float = 0.0
    secrets: list[str] = []
    """Names of the secrets the agent resolves locally for this task; never their values."""
    final_exit_codes: list[int] = []
    """A command task's exit codes that end it for good (not retried)."""


class _Event(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
    tag_field="type",
):
    task_id: str
    attempt: int
    agent_id: str
    at: float
    fence: int = 0
    """The fencing token of the agent's claim of this attempt (microseconds of Redis' clock
    when the lease was claimed): a later claim, by an agent that took the lease over, has a
    higher one, and the dispatcher refuses the events of a lower one. 0: not known (an agent
    from before fencing, or a claim whose reply was lost), fenced by agent id alone."""


class _Ended(_Event, frozen=True, kw_only=True, omit_defaults=True):
    """An attempt that ran: its log stays on the agent; the event carries a tail and where."""

    log_tail: str = ""
    """The last lines of the attempt's log (about 20 lines, at most 2 KiB)."""
    log_ref: str = ""
    """Where the agent keeps the whole log, e.g. ``dir:<pool>/<task_id>/<attempt>.log``."""


class Started(_Event, frozen=True, tag="started"):
    pass


class Succeeded(_Ended, frozen=True, kw_only=True, tag="succeeded"):
    result: Any = None


class Failed(_Ended, frozen=True, kw_only=True, tag="failed"):
    error_type: str
    message: str
    traceback: str = ""
    retryable: bool = True


class TimedOut(_Ended, frozen=True, kw_only=True, tag="timed_out"):
    timeout: float


class Cancelled(_Ended, frozen=True, kw_only=True, tag="cancelled"):
    pass


class Expired(_Event, frozen=True, tag="expired"):
    pass


class Returned(_Event, frozen=True, kw_only=True, tag="returned"):
    """An attempt the agent received but did not start: when it drains or waited too long for
    a slot (a requeue would spend the pool queue's delivery limit), or whose claim found
    another live agent holding the attempt. The dispatcher publishes the same
    attempt again if it has not started (at once, or after a pause for ``held_elsewhere``)."""

    reason: Annotated[str, msgspec.Meta(max_length=64)]
    """Why, in a word or two (``no_slot``, ``draining``, ``agent_error``, ``held_elsewhere``)."""


AGENT_SHUTDOWN = "AgentShutdown"
"""``error_type`` of the ``failed`` event of an attempt a draining agent stopped and gave back:
the dispatcher runs it again without counting it against the task's attempts."""
HELD_ELSEWHERE = "held_elsewhere"
"""A ``Returned`` reason: the claim found the attempt held by another live agent."""


class AgentOnline(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="agent_online",
    tag_field="type",
):
    agent_id: str
    pool: str
    hostname: str
    pid: int
    concurrency: int
    at: float


class AgentOffline(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="agent_offline",
    tag_field="type",
):
    agent_id: str
    pool: str
    reason: str
    at: float


TaskEvent = Started | Succeeded | Failed | TimedOut | Cancelled | Expired | Returned
Event = TaskEvent | AgentOnline | AgentOffline
TERMINAL_EVENTS = (Succeeded, Failed, TimedOut, Cancelled, Expired)
LOGGED_EVENTS = (Succeeded, Failed, TimedOut, Cancelled)
"""Terminal events of an attempt that ran: they carry ``log_tail`` and ``log_ref``."""


TASK_TYPE = "rexec.task"
TASK_BATCH_TYPE = "rexec.tasks"
"""The AMQP ``type`` of a task message: one ``TaskMessage``, or a ``TaskBatch``."""


class TaskBatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Several attempts for one pool in one message: one publish, one confirm, one signature,
    one delivery and one ack for all of them (protocol 1.2)."""

    v: int = PROTOCOL_VERSION
    tasks: list[TaskMessage]
    traceparents: list[str] = []
    """W3C ``traceparent`` of each task's send span, in the order of ``tasks`` (empty when
    tracing is off); a single-task message carries it in its AMQP headers instead."""


class EventBatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Agents send events in batches: one AMQP message (and one confirm) for many events."""

    v: int = PROTOCOL_VERSION
    events: list[Event]


class Control(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Dispatcher to one agent, over ``rexec.control``: stop an attempt it runs."""

    v: int = PROTOCOL_VERSION
    action: Literal["cancel", "lease_lost"]
    task_id: str
    attempt: int


class MessageError(ValueError):
    """A message that cannot be used: the text says what was wrong with it."""


_encoder = msgspec.json.Encoder()
_header_decoder = msgspec.json.Decoder(_Header)
_task_decoder = msgspec.json.Decoder(TaskMessage)
_task_batch_decoder = msgspec.json.Decoder(TaskBatch)
_batch_decoder = msgspec.json.Decoder(EventBatch)
_control_decoder = msgspec.json.Decoder(Control)


def encode(message: TaskMessage | TaskBatch | EventBatch | Control) -> bytes:
    return _encoder.encode(message)


def _check_version(body: bytes, what: str) -> None:
    try:
        header = _header_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise MessageError(f"malformed {what} message: {exc}") from None
    except RecursionError:  # msgspec's own limit on nesting, whatever the fields
        raise MessageError(f"malformed {what} message: JSON nested too deeply") from None
    if header.v not in SUPPORTED_VERSIONS:
        raise MessageError(
            f"unsupported protocol version {header.v} in {what} message "
            f"(this side speaks {sorted(SUPPORTED_VERSIONS)}); upgrade the older side"
        )


T = TypeVar("T")


def _decode(decoder: msgspec.json.Decoder[T], body: bytes, what: str) -> T:
    _check_version(body, what)
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise MessageError(f"malformed {what} message: {exc}") from None
    except RecursionError:
        raise MessageError(f"malformed {what} message: JSON nested too deeply") from None


def decode_task(body: bytes) -> TaskMessage:
    return _decode(_task_decoder, body, "task")


def decode_task_batch(body: bytes) -> TaskBatch:
    batch = _decode(_task_batch_decoder, body, "task batch")
    if not batch.tasks:
        raise MessageError("malformed task batch message: it carries no task")
    if batch.traceparents and len(batch.traceparents) != len(batch.tasks):
        raise MessageError(
            f"malformed task batch message: {len(batch.traceparents)} traceparents "
            f"for {len(batch.tasks)} tasks"
        )
    return batch


def decode_events(body: bytes) -> EventBatch:
    return _decode(_batch_decoder, body, "event")


def decode_control(body: bytes) -> Control:
    return _decode(_control_decoder, body, "control")
