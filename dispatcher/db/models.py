"""SQLAlchemy models of the metadata database.

Times are epoch seconds (floats): portable between SQLite and PostgreSQL and cheap to compare.
Arguments and results are stored as JSON text encoded by msgspec; the dispatcher passes them
through to the wire without decoding them on the hot path.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Pool(Base):
    __tablename__ = "pools"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Double)
    max_running: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """The relay keeps at most this many of the pool's tasks running or sent; None: no limit."""


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    pool: Mapped[str] = mapped_column(ForeignKey("pools.name"))
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(32))
    """The first characters of the secret, shown so operators can tell tokens apart."""
    secret_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[float] = mapped_column(Double)
    last_used_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Double, nullable=True)


class ApiKey(Base):
    """An operator API key: only the hash of its secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(32))
    secret_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[float] = mapped_column(Double)
    last_used_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Double, nullable=True)


class AuditEvent(Base):
    """Who did what and when: token, API-key and operator actions (task states are in
    ``task_transitions``)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_target", "action", "target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Double, index=True)
    actor_kind: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str] = mapped_column(String(64))
    actor_name: Mapped[str] = mapped_column(String(200), default="")
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(200), default="")
    detail_json: Mapped[str] = mapped_column(Text, default="{}")


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    pool: Mapped[str] = mapped_column(ForeignKey("pools.name"), index=True)
    token_id: Mapped[str | None] = mapped_column(ForeignKey("tokens.id"), nullable=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    concurrency: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="online")
    registered_at: Mapped[float] = mapped_column(Double)
    last_seen_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    protocol_minor: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    broker_user: Mapped[str | None] = mapped_column(String(128), nullable=True)
    """The RabbitMQ user issued to this agent (scoped credentials), if any."""
    redis_user: Mapped[str | None] = mapped_column(String(200), nullable=True)
    redis_password_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """SHA-256 of the Redis password: enough to re-create the ACL user after Redis lost it."""
    credentials_withdrawn_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    lost_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    """When the watchdog judged the agent lost: it keeps its credentials for
    ``credentials.LOST_AGENT_KEEP`` from then (its registration may be long before)."""
    log_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Where the agent serves its task logs (announced at registration)."""


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        # Also the index of lookups by key (``GET /v1/tasks?pool=&idempotency_key=``).
        UniqueConstraint("pool", "idempotency_key", name="uq_tasks_pool_idempotency_key"),
        Index("ix_tasks_pool_state", "pool", "state"),
        Index("ix_tasks_state", "state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    pool: Mapped[str] = mapped_column(ForeignKey("pools.name"))
    kind: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(Text)
    argv_json: Mapped[str] = mapped_column(Text, default="[]")
    args_json: Mapped[str] = mapped_column(Text, default="[]")
    kwargs_json: Mapped[str] = mapped_column(Text, default="{}")
    secrets_json: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    """Names of the secrets the agent resolves for the task (values never reach this plane)."""
    state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    max_attempts: Mapped[int] = mapped_column(Integer)
    retry_backoff: Mapped[float] = mapped_column(Double)
    timeout: Mapped[float | None] = mapped_column(Double, nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    agent_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    result_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Its arguments are not shown to viewer API keys (they are stored and sent as any)."""
    final_exit_codes_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    """A command task's exit codes that fail it for good (a JSON list; none when NULL)."""
    fence: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    """The fencing token of the claim the running attempt started under (0: none known):
    events of an older claim are refused (``statemachine``)."""
    trace_parent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """W3C ``traceparent`` of the task's creation: every span of the task joins its trace."""
    created_at: Mapped[float] = mapped_column(Double)
    started_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    log_ref: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Where the agent keeps the latest reported attempt's log (the log itself stays there)."""
    log_tail: Mapped[str | None] = mapped_column(Text, nullable=True)


class TaskLog(Base):
    """Per attempt that ran: which agent keeps its log, where, and its last lines."""

    __tablename__ = "task_logs"

    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64))
    log_ref: Mapped[str] = mapped_column(Text)
    log_tail: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[float] = mapped_column(Double)


class TaskTransition(Base):
    """State history of a task: one row per applied transition (the audit trail)."""

    __tablename__ = "task_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[float] = mapped_column(Double)
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str] = mapped_column(String(16))
    agent_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class Outbox(Base):
    """Attempts committed but not yet confirmed by the broker (transactional outbox)."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    available_at: Mapped[float] = mapped_column(Double, index=True)


class DispatcherKey(Base):
    """Keys the dispatcher replicas share, e.g. the generated task-signing key."""

    __tablename__ = "dispatcher_keys"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Double)


class Leader(Base):
    """Leader leases among dispatcher replicas; ``epoch`` grows at each change of holder."""

    __tablename__ = "leaders"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    epoch: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[float] = mapped_column(Double)
