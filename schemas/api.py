"""Bodies of the Remote Execution API, shared by the dispatcher's server and the client."""

from __future__ import annotations

import enum
from typing import Any

import msgspec

API_PREFIX = "/v1"


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.CANCELLED,
        TaskState.TIMED_OUT,
        TaskState.EXPIRED,
    }
)


class SubmitTask(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A task to run: either ``target`` (``module:function``) or ``command`` (argv).

    Encoded without defaults, so a client sends ``secrets`` only to servers that need it."""

    pool: str
    target: str | None = None
    command: list[str] | None = None
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    timeout: float | None = None
    max_attempts: int | None = None
    retry_backoff: float | None = None
    """Base seconds of exponential backoff between attempts (with jitter)."""
    expires_in: float | None = None
    """Seconds the task may wait in the queue before it expires unstarted."""
    idempotency_key: str | None = None
    secrets: list[str] = []
    """Names of secrets the agent resolves from its own backend (values never reach us)."""


class SubmitBatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tasks: list[SubmitTask]


class TaskView(msgspec.Struct, kw_only=True):
    id: str
    pool: str
    kind: str
    target: str
    argv: list[str]
    args: list[Any]
    kwargs: dict[str, Any]
    state: TaskState
    attempt: int
    max_attempts: int
    agent_id: str | None
    result: Any
    error: dict[str, Any] | None
    timeout: float | None
    idempotency_key: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested: bool = False
    secrets: list[str] = []


class SubmitBatchResult(msgspec.Struct, kw_only=True):
    ids: list[str]


class WaitTasks(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Long-poll for many tasks at once: returns when all are terminal or ``wait`` ran out."""

    ids: list[str]
    wait: float = 30.0


class WaitResult(msgspec.Struct, kw_only=True):
    tasks: list[TaskView]
    """In the order asked; check ``state``: some may still be running when the wait ran out."""


class TaskHistoryEntry(msgspec.Struct, kw_only=True):
    at: float
    attempt: int
    from_state: str | None
    to_state: str
    agent_id: str | None
    reason: str | None


class PoolCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str = ""


class PoolView(msgspec.Struct, kw_only=True):
    name: str
    description: str
    draining: bool
    created_at: float
    tasks: dict[str, int] = {}
    """Task counts by state."""


class AgentView(msgspec.Struct, kw_only=True):
    id: str
    pool: str
    hostname: str
    pid: int
    concurrency: int
    state: str
    """``online`` while its heartbeat key lives, else ``offline`` or ``lost``."""
    registered_at: float
    last_seen_at: float | None
    heartbeat_age: float | None
    running: int = 0


class AgentRegister(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pool: str
    hostname: str
    pid: int
    concurrency: int
    version: int
    allow: list[str] = []


class AgentRegistered(msgspec.Struct, kw_only=True):
    agent_id: str
    pool: str
    heartbeat_ttl: float
    protocol_version: int
    amqp_url: str | None = None
    """Broker URL with credentials scoped to the pool, when the dispatcher issues them."""
    redis_url: str | None = None


class TokenCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pool: str
    name: str = ""
    expires_in: float | None = None


class TokenView(msgspec.Struct, kw_only=True):
    id: str
    pool: str
    name: str
    prefix: str
    created_at: float
    last_used_at: float | None
    expires_at: float | None
    state: str
    """``active``, ``expired`` or ``revoked``."""


class TokenCreated(msgspec.Struct, kw_only=True):
    token: TokenView
    secret: str
    """Shown once; only its hash is stored."""


class ErrorBody(msgspec.Struct, kw_only=True):
    error: str
    detail: Any = None
