"""Bodies of the Remote Execution API, shared by the dispatcher's server and the client."""

from __future__ import annotations

import enum
from typing import Annotated, Any

import msgspec

API_PREFIX = "/v1"

# Bounds of what a request may ask. They are msgspec constraints, so the decoder refuses a value
# out of range before any handler sees it, and the OpenAPI document shows each one.
MAX_ATTEMPTS = 100
"""Attempts one task may have in all: enough for any retry policy, few enough to end."""
MAX_RETRY_BACKOFF = 86_400.0
"""Longest base backoff between attempts (seconds): a day."""
MIN_RETRY_BACKOFF = 0.001
"""Shortest non-zero base backoff (seconds); 0 retries at once."""
MIN_TIMEOUT = 0.001
"""Shortest execution timeout, and shortest ``expires_in`` (seconds)."""
MAX_TIMEOUT = 7 * 86_400.0
"""Longest execution timeout of one attempt (seconds): a week."""
MAX_EXPIRES_IN = 30 * 86_400.0
"""Longest a task may wait in its queue before it expires unstarted (seconds): 30 days."""
MAX_NESTING = 32
"""Deepest nesting of arrays and objects in a task's ``args`` and ``kwargs`` (the list or
object itself is one level) and in a result; deeper values are refused, since every plane
that decodes them pays for the depth."""
MAX_RUNNING = 1_000_000
"""Largest ``max_running`` of a pool (a limit above every real pool's size is no limit)."""
MAX_CREDENTIAL_LIFETIME = 10 * 366 * 86_400.0
"""Longest ``expires_in`` of an agent token or an API key (seconds): ten years (beyond it,
keep the credential unexpiring and revoke it)."""
INT32_MAX = 2**31 - 1
"""The largest integer the metadata database's integer columns hold."""

Attempts = Annotated[int, msgspec.Meta(ge=1, le=MAX_ATTEMPTS)]
Backoff = Annotated[float, msgspec.Meta(ge=0, le=MAX_RETRY_BACKOFF)]
Timeout = Annotated[float, msgspec.Meta(ge=MIN_TIMEOUT, le=MAX_TIMEOUT)]
ExpiresIn = Annotated[float, msgspec.Meta(ge=MIN_TIMEOUT, le=MAX_EXPIRES_IN)]
RunningLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_RUNNING)]
CredentialLifetime = Annotated[float, msgspec.Meta(gt=0, le=MAX_CREDENTIAL_LIFETIME)]
ExitCode = Annotated[int, msgspec.Meta(ge=1, le=255)]
MAX_FINAL_EXIT_CODES = 32
"""Most exit codes one command task may name as final."""


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
    timeout: Timeout | None = None
    """Seconds an attempt may run before its agent kills it (0.001 to a week)."""
    max_attempts: Attempts | None = None
    """Attempts in all, the first included (1 to 100)."""
    retry_backoff: Backoff | None = None
    """Base seconds of exponential backoff between attempts (with jitter): 0 (retry at once),
    or 0.001 to a day."""
    expires_in: ExpiresIn | None = None
    """Seconds the task may wait in the queue before it expires unstarted (0.001 to 30 days)."""
    idempotency_key: str | None = None
    secrets: list[str] = []
    """Names of secrets the agent resolves from its own backend (values never reach us)."""
    sensitive: bool = False
    """The arguments (``args``, ``kwargs``, a command's argv) are not shown to viewer keys."""
    final_exit_codes: Annotated[list[ExitCode], msgspec.Meta(max_length=MAX_FINAL_EXIT_CODES)] = []
    """Exit codes of a command task that fail it for good, with no further attempt (a usage
    error, a refusal that no retry can change); any other non-zero code is retried."""


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
    log_tail: str = ""
    """The last lines of the latest reported attempt's log; the whole log stays on the agent."""
    log_ref: str = ""
    """Where that agent keeps the whole log (``rexec logs ID`` fetches it through the agent)."""
    secrets: list[str] = []
    sensitive: bool = False
    """Submitted as sensitive: a viewer key gets ``args``, ``kwargs`` and ``argv`` empty."""
    final_exit_codes: list[int] = []


MAX_CHANGES = 1000
"""Most changes one read of the change feed returns."""


class TaskChange(msgspec.Struct, kw_only=True):
    """One applied state transition of a task (a row of ``task_transitions``)."""

    seq: int
    """The transition's sequence number: read on with ``after=<seq>``."""
    task_id: str
    attempt: int
    state: TaskState
    """The state the task entered."""
    at: float
    agent_id: str | None
    reason: str | None
    idempotency_key: str | None


class TaskChanges(msgspec.Struct, kw_only=True):
    cursor: int
    """Pass as ``after`` to read on: the last change's ``seq``, or ``after`` when none came."""
    changes: list[TaskChange]
    """Oldest first."""


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
    by: str | None = None
    """Who asked for it, for operator actions (a cancel): ``apikey <id> (<name>)`` or ``bootstrap``."""


class PoolCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str = ""
    max_running: RunningLimit | None = None
    """At most this many of the pool's tasks running or sent to agents at once; None: no limit."""


class PoolUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    max_running: RunningLimit | None
    """The new limit of running (and sent, not yet started) tasks; null removes the limit."""


class PoolView(msgspec.Struct, kw_only=True):
    name: str
    description: str
    draining: bool
    created_at: float
    tasks: dict[str, int] = {}
    """Task counts by state."""
    max_running: int | None = None


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
    log_url: str = ""


class AgentRegister(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    pool: str
    hostname: Annotated[str, msgspec.Meta(max_length=255)]
    pid: Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=100_000)]
    version: Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
    """The wire protocol's major version the agent speaks."""
    protocol_minor: Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)] = 0
    """Its minor version: the dispatcher accepts agents up to one minor version behind."""
    allow: list[str] = []
    log_url: str = ""
    """Where the CLI reaches this agent's task logs (``GET <log_url>/logs/<task>/<attempt>``)."""


class ScopedCredentials(msgspec.Struct, kw_only=True):
    """A broker user and a Redis user of the agent's own; the agent puts them in its URLs."""

    amqp_username: str
    amqp_password: str
    redis_username: str
    redis_password: str


class AgentRegistered(msgspec.Struct, kw_only=True):
    agent_id: str
    pool: str
    heartbeat_ttl: float
    protocol_version: int
    protocol_minor: int = 0
    credentials: ScopedCredentials | None = None
    """Set when the orchestration plane issues scoped credentials (the default)."""
    signing_public_keys: list[str] = []
    """Public keys of the orchestration plane: the agent runs only tasks signed by one."""


class LogGrant(msgspec.Struct, kw_only=True):
    """Permission to read one attempt's log from the agent that ran it, and where to find it."""

    task_id: str
    attempt: int
    agent_id: str
    agent_state: str
    """The agent's row state (``online``, ``offline``, ``lost``) when the grant was issued."""
    log_url: str
    """The agent's log server; empty when it announced none (no health port)."""
    log_ref: str
    """Where the agent keeps the log (empty while the attempt runs: not reported yet)."""
    log_tail: str
    grant: str
    """Send as ``Authorization: Bearer <grant>`` to ``<log_url>/logs/<task_id>/<attempt>``."""
    expires_at: float
    running: bool = False


class TokenCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pool: str
    name: Annotated[str, msgspec.Meta(max_length=200)] = ""
    expires_in: CredentialLifetime | None = None


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


class Role(enum.StrEnum):
    """What an operator API key may do; each role includes the ones below it."""

    VIEWER = "viewer"
    """Read-only: tasks, pools, agents, metrics."""
    SUBMITTER = "submitter"
    """A viewer that may also submit and cancel tasks."""
    ADMIN = "admin"
    """Everything: pools, agent tokens, API keys, the audit log."""

    def allows(self, needed: Role) -> bool:
        return ROLE_RANK[self] >= ROLE_RANK[needed]


ROLE_RANK = {Role.VIEWER: 0, Role.SUBMITTER: 1, Role.ADMIN: 2}


class ApiKeyCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Role
    name: str = ""
    expires_in: CredentialLifetime | None = None


class ApiKeyView(msgspec.Struct, kw_only=True):
    id: str
    name: str
    role: Role
    prefix: str
    created_at: float
    last_used_at: float | None
    expires_at: float | None
    state: str
    """``active``, ``expired`` or ``revoked``."""


class ApiKeyCreated(msgspec.Struct, kw_only=True):
    key: ApiKeyView
    secret: str
    """Shown once; only its hash is stored."""


class Principal(msgspec.Struct, kw_only=True):
    """Who a request's API key belongs to."""

    kind: str
    """``apikey``, or ``bootstrap`` for the REXEC_API_KEY of ``rexec serve``."""
    id: str
    name: str
    role: Role


class AuditEntry(msgspec.Struct, kw_only=True):
    id: int
    at: float
    actor_kind: str
    """``apikey``, ``bootstrap`` or ``token`` (an agent registering with its token)."""
    actor_id: str
    actor_name: str
    action: str
    """Like ``pool.create``, ``token.revoke``, ``apikey.create``, ``task.cancel``, ``login``."""
    target: str
    detail: dict[str, Any] = {}
