"""The service layer behind the Remote Execution API: validation, database work, broker calls.

Every function takes the :class:`~rexec.dispatcher.runtime.Runtime` and returns API bodies from
``rexec.schemas.api``. Errors are :class:`ServiceError` subclasses whose message says what was wrong
and what to do; the HTTP layer maps each class to a status code. State changes of existing
tasks go through the state machine (``statemachine`` decides, ``transitions`` writes).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import msgspec
from redis.exceptions import RedisError
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from rexec.schemas import messages, tracing
from rexec.schemas.amqp import connection_up
from rexec.schemas.api import (
    MAX_NESTING,
    MIN_RETRY_BACKOFF,
    TERMINAL_STATES,
    AgentRegister,
    AgentRegistered,
    AgentView,
    PoolCreate,
    PoolView,
    Role,
    SubmitTask,
    TaskHistoryEntry,
    TaskState,
    TaskView,
    TokenCreate,
    TokenCreated,
    TokenView,
)
from rexec.schemas.names import validate_pool_name, validate_secret_names
from rexec.schemas.settings import Settings

from . import audit, credentials, statemachine, topology, transitions
from .db.models import Agent, Outbox, Pool, Task, TaskTransition, Token
from .groupcommit import GroupCommit
from .nesting import MAX_BODY_DEPTH, nested_deeper_than, text_deeper_than
from .outbox import Due
from .runtime import BROKER_ERRORS, Runtime

log = logging.getLogger("rexec.service")

T = TypeVar("T")
READY_TIMEOUT = 5.0
"""Seconds the readiness check waits for the database."""

TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MAX_WAIT = 60.0
"""Longest long-poll the API grants (seconds)."""
WAIT_RECHECK = 1.0
"""A long-poll re-reads the task this often even without a wake-up (other replicas, expiry)."""
MAX_LIST_LIMIT = 10_000
CANCEL_MARKER_TTL = 86_400
TOKEN_PREFIX = "rexec_at_"
IDEMPOTENCY_KEY_MAX = 200

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


# --- errors -----------------------------------------------------------------------------------


class ServiceError(Exception):
    """A request the service refuses; ``str(error)`` is the message shown to the user."""

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class NotFound(ServiceError):
    """Something named in the request does not exist (404)."""


class Conflict(ServiceError):
    """The request contradicts the current state (409)."""


class Invalid(ServiceError):
    """A request whose values are unacceptable (422)."""


class PayloadTooLarge(ServiceError):
    """Arguments larger than ``max_payload_bytes`` (413)."""


class Unauthorized(ServiceError):
    """A missing, unknown, revoked or expired credential (401)."""


class Unavailable(ServiceError):
    """A server the request needs refused or could not be reached (503)."""


# --- conversions ------------------------------------------------------------------------------


def _json_text(value: Any) -> str:
    return _encoder.encode(value).decode()


def _decode_json(raw: str | None) -> Any:
    return None if raw is None else _stored(raw)


UNSHOWN = f"(not shown: nested more than {MAX_BODY_DEPTH} levels deep)"
"""Shown for a stored value too deep to decode and send (a row written before submissions
and results were bounded): the rest of the task still reads."""


def _stored(raw: str) -> Any:
    """A JSON column's value, or ``UNSHOWN`` when it nests too deeply to decode and encode
    again without a RecursionError (which would break every read that includes the row)."""
    if text_deeper_than(raw, MAX_BODY_DEPTH):
        return UNSHOWN
    return _decoder.decode(raw)


def task_view(task: Task) -> TaskView:
    error = _decode_json(task.error_json)
    args = _stored(task.args_json)
    kwargs = _stored(task.kwargs_json)
    return TaskView(
        id=task.id,
        pool=task.pool,
        kind=task.kind,
        target=task.target,
        argv=_decoder.decode(task.argv_json),
        args=args if isinstance(args, list) else [args],
        kwargs=kwargs if isinstance(kwargs, dict) else {"unshown": kwargs},
        secrets=_decoder.decode(task.secrets_json or "[]"),
        state=TaskState(task.state),
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        agent_id=task.agent_id,
        result=_decode_json(task.result_json),
        error=error if isinstance(error, dict) else None,
        timeout=task.timeout,
        idempotency_key=task.idempotency_key,
        created_at=task.created_at,
        started_at=task.started_at,
        finished_at=task.finished_at,
        cancel_requested=task.cancel_requested,
        log_tail=task.log_tail or "",
        log_ref=task.log_ref or "",
        sensitive=task.sensitive,
        final_exit_codes=_decoder.decode(task.final_exit_codes_json or "[]"),
    )


def shown_to(role: Role, view: TaskView) -> TaskView:
    """The view as ``role`` may see it: a viewer gets a sensitive task's arguments (``args``,
    ``kwargs``, ``argv``) empty, since a read-only key is handed out more widely than the
    keys that submit (dashboards, on-call) and arguments may carry customer data."""
    if not view.sensitive or role.allows(Role.SUBMITTER):
        return view
    return msgspec.structs.replace(view, args=[], kwargs={}, argv=[])


def _pool_view(pool: Pool, counts: dict[str, int] | None = None) -> PoolView:
    return PoolView(
        name=pool.name,
        description=pool.description,
        draining=pool.draining,
        created_at=pool.created_at,
        tasks=counts or {},
        max_running=pool.max_running,
    )


def credential_state(revoked_at: float | None, expires_at: float | None, now: float) -> str:
    """``revoked``, ``expired`` or ``active``: the state of an agent token or an API key."""
    if revoked_at is not None:
        return "revoked"
    if expires_at is not None and expires_at <= now:
        return "expired"
    return "active"


def _token_state(token: Token, now: float) -> str:
    return credential_state(token.revoked_at, token.expires_at, now)


def _token_view(token: Token, now: float) -> TokenView:
    return TokenView(
        id=token.id,
        pool=token.pool,
        name=token.name,
        prefix=token.prefix,
        created_at=token.created_at,
        last_used_at=token.last_used_at,
        expires_at=token.expires_at,
        state=_token_state(token, now),
    )


# --- tasks ------------------------------------------------------------------------------------


def _task_row(body: SubmitTask, settings: Settings, now: float) -> dict[str, Any]:
    """Validate one submission and return the column values of its ``Task`` row."""
    if (body.target is None) == (body.command is None):
        raise Invalid("give exactly one of 'target' (module:function) or 'command' (argv list)")
    if body.target is not None:
        if not TARGET.match(body.target):
            raise Invalid(
                f"invalid target {body.target!r}: use 'module:function', "
                "for example 'myapp.jobs:resize_image'"
            )
        kind, target, argv = "function", body.target, "[]"
    else:
        command = body.command or []
        if not command or not command[0]:
            raise Invalid("'command' must be a non-empty list of strings (the argv to run)")
        for index, arg in enumerate(command):
            if "\x00" in arg:
                raise Invalid(
                    f"command[{index}] contains a NUL byte (\\u0000), which no program can be "
                    "given in its argv: remove it (pass binary data in a file, or encoded)"
                )
        if body.args or body.kwargs:
            raise Invalid(
                "'args' and 'kwargs' apply to function targets only; put a command's "
                "arguments in 'command'"
            )
        kind, target, argv = "command", command[0], _json_text(command)
    for name, value in (("args", body.args), ("kwargs", body.kwargs)):
        if nested_deeper_than(value, MAX_NESTING):
            raise Invalid(
                f"{name} are nested more than {MAX_NESTING} levels deep (of lists and objects, "
                f"'{name}' itself included): flatten them, or pass a reference (a URL or "
                "object key) to the data"
            )
    args = _json_text(body.args)
    kwargs = _json_text(body.kwargs)
    size = len(args) + len(kwargs) + (len(argv) if kind == "command" else 0)
    limit = settings.max_payload_bytes
    if size > limit:
        raise PayloadTooLarge(
            f"task arguments are {size} bytes encoded, over the limit of {limit} bytes "
            "(REXEC_MAX_PAYLOAD_BYTES): pass a reference (a URL or object key) instead of the data"
        )
    max_attempts = settings.default_max_attempts if body.max_attempts is None else body.max_attempts
    if max_attempts < 1:
        raise Invalid(f"max_attempts must be at least 1, got {max_attempts}")
    if body.timeout is not None and not body.timeout > 0:
        raise Invalid(f"timeout must be a positive number of seconds, got {body.timeout}")
    backoff = settings.default_retry_backoff if body.retry_backoff is None else body.retry_backoff
    if not backoff >= 0:
        raise Invalid(f"retry_backoff must be zero or more seconds, got {backoff}")
    if body.retry_backoff is not None and 0 < backoff < MIN_RETRY_BACKOFF:
        raise Invalid(
            f"retry_backoff must be 0 (retry at once) or at least {MIN_RETRY_BACKOFF} seconds, "
            f"got {backoff}"
        )
    if body.expires_in is not None and not body.expires_in > 0:
        raise Invalid(f"expires_in must be a positive number of seconds, got {body.expires_in}")
    key = body.idempotency_key
    if key is not None and not 0 < len(key) <= IDEMPOTENCY_KEY_MAX:
        raise Invalid(f"idempotency_key must be 1 to {IDEMPOTENCY_KEY_MAX} characters long")
    # Checked here, not left to the database: concurrent submits share one transaction, and
    # PostgreSQL's refusal of a NUL would fail all of them.
    for field_name, text_value in (("pool", body.pool), ("idempotency_key", key or "")):
        if "\x00" in text_value:
            raise Invalid(f"{field_name} contains a NUL byte (\\u0000): remove it")
    try:
        validate_secret_names(body.secrets)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    if body.final_exit_codes and kind != "command":
        raise Invalid(
            "final_exit_codes applies to command tasks only: a function task fails for good "
            "by raising rexec.worker.context.NonRetryable"
        )
    task_id = uuid.uuid4().hex
    return {
        "id": task_id,
        "pool": body.pool,
        "kind": kind,
        "target": target,
        "argv_json": argv,
        "args_json": args,
        "kwargs_json": kwargs,
        "secrets_json": _json_text(body.secrets),
        "state": TaskState.QUEUED.value,
        "attempt": 1,
        "max_attempts": max_attempts,
        "retry_backoff": backoff,
        "timeout": body.timeout,
        "expires_at": None if body.expires_in is None else now + body.expires_in,
        "idempotency_key": key,
        "agent_id": None,
        "result_json": None,
        "error_json": None,
        "cancel_requested": False,
        "sensitive": body.sensitive,
        "final_exit_codes_json": _json_text(sorted(set(body.final_exit_codes)))
        if body.final_exit_codes
        else None,
        "trace_parent": tracing.task_created(task_id, body.pool, target),
        "created_at": now,
        "started_at": None,
        "finished_at": None,
    }


def _unknown_pool(pool: str) -> NotFound:
    return NotFound(f"unknown pool {pool!r}: create it with `rexec pool create {pool}`")


async def _known_pools(rt: Runtime, session: AsyncSession, pools: Iterable[str]) -> set[str]:
    """Those of ``pools`` that exist. Pools are never deleted, so one seen is not looked up again."""
    wanted = set(pools)
    if unseen := wanted - rt.known_pools:
        rt.known_pools.update(await session.scalars(select(Pool.name).where(Pool.name.in_(unseen))))
    return wanted & rt.known_pools


async def _check_pools(rt: Runtime, session: AsyncSession, pools: Iterable[str]) -> None:
    wanted = set(pools)
    for pool in sorted(wanted - await _known_pools(rt, session, wanted)):
        raise _unknown_pool(pool)


async def submit(rt: Runtime, body: SubmitTask) -> tuple[TaskView, bool]:
    """Accept one task; return its view and whether it is new (False: idempotency key hit).

    Concurrent submits share a write transaction (``groupcommit``); each returns once its row
    is committed.
    """
    row = _task_row(body, rt.settings, time.time())
    if rt.submits is None:
        rt.submits = GroupCommit(partial(_write_submits, rt))
    task_id = await rt.submits(row)
    if task_id == row["id"]:
        return task_view(Task(**row)), True
    async with rt.sessions() as session:
        return task_view(await _load_task(session, task_id)), False


async def _write_submits(rt: Runtime, rows: Sequence[dict[str, Any]]) -> list[str | Exception]:
    """Insert the rows of concurrent submits in one transaction: each gets its task's id, or
    the error of its own (an unknown pool fails only the submits naming it)."""

    async def write(session: AsyncSession, accepted: _Accepted) -> list[str | Exception]:
        known = await _known_pools(rt, session, (row["pool"] for row in rows))
        ids = iter(
            await _insert_rows(rt, session, [r for r in rows if r["pool"] in known], accepted)
        )
        return [next(ids) if row["pool"] in known else _unknown_pool(row["pool"]) for row in rows]

    try:
        return await _insert_tasks(rt, write)
    except IntegrityError:
        if len(rows) == 1:
            raise
        return [await _write_alone(rt, row) for row in rows]  # the error stays its own


async def _write_alone(rt: Runtime, row: dict[str, Any]) -> str | Exception:
    try:
        [outcome] = await _write_submits(rt, [row])
    except IntegrityError as exc:
        return exc
    return outcome


async def submit_batch(rt: Runtime, bodies: Sequence[SubmitTask]) -> list[str]:
    """Accept many tasks in one transaction (bulk insert); return their ids in order.

    A task whose idempotency key matches an existing task (or an earlier one in the batch)
    gets that task's id and is not inserted again. Nothing is stored if any task is invalid.
    """
    now = time.time()
    rows: list[dict[str, Any]] = []
    for index, body in enumerate(bodies):
        try:
            rows.append(_task_row(body, rt.settings, now))
        except ServiceError as exc:
            raise type(exc)(f"task {index}: {exc.message}", exc.detail) from None
    if not rows:
        return []

    async def write(session: AsyncSession, accepted: _Accepted) -> list[str]:
        await _check_pools(rt, session, (row["pool"] for row in rows))
        return await _insert_rows(rt, session, rows, accepted)

    return await _insert_tasks(rt, write)


async def _insert_tasks(rt: Runtime, write: Callable[[AsyncSession, _Accepted], Awaitable[T]]) -> T:
    """Run ``write`` in a transaction, then publish its new tasks at once (``direct``) or wake
    the relay for those left to it. An idempotency key that raced with another request's
    (IntegrityError) gets one more try, which sees the other's row."""
    accepted = _Accepted()
    try:
        async with rt.sessions.begin() as session:
            result = await write(session, accepted)
    except IntegrityError:
        accepted = _Accepted()
        async with rt.sessions.begin() as session:
            result = await write(session, accepted)
    if accepted.direct and rt.direct is not None:
        rt.direct.offer(accepted.direct)
    if accepted.relayed:
        rt.wake_relay()
    return result


@dataclass
class _Accepted:
    """What a submit transaction inserted: rows to publish at once, and whether the relay
    has rows to publish (a pool that is draining or has a ``max_running``)."""

    direct: list[Due] = field(default_factory=list)
    relayed: bool = False


async def _insert_rows(
    rt: Runtime, session: AsyncSession, rows: Sequence[dict[str, Any]], accepted: _Accepted
) -> list[str]:
    """Insert tasks and their first outbox rows (bulk); return each row's task id in order.

    A row whose idempotency key names an existing task (or an earlier row) gets that task's id
    and is not inserted.
    """
    keyed: dict[tuple[str, str], str] = {}
    wanted: dict[str, set[str]] = {}
    for row in rows:
        if row["idempotency_key"] is not None:
            wanted.setdefault(row["pool"], set()).add(row["idempotency_key"])
    for pool, keys in wanted.items():
        found = await session.execute(
            select(Task.idempotency_key, Task.id).where(
                Task.pool == pool, Task.idempotency_key.in_(keys)
            )
        )
        for key, task_id in found:
            if key is not None:
                keyed[(pool, key)] = task_id
    ids: list[str] = []
    new: list[dict[str, Any]] = []
    for row in rows:
        key = row["idempotency_key"]
        if key is not None:
            existing = keyed.get((row["pool"], key))
            if existing is not None:
                ids.append(existing)
                continue
            keyed[(row["pool"], key)] = row["id"]
        ids.append(row["id"])
        new.append(row)
    if new:
        await session.execute(insert(Task), new)
        await _insert_outbox(rt, session, new, accepted)
    return ids


async def _insert_outbox(
    rt: Runtime, session: AsyncSession, new: Sequence[dict[str, Any]], accepted: _Accepted
) -> None:
    """The first attempt's outbox rows: due after the lease for those published at once,
    due now for those left to the relay."""
    lease = rt.direct.lease if rt.direct is not None else 0.0
    direct = await _direct_pools(session, {row["pool"] for row in new}) if lease else set()
    outbox = [
        {
            "task_id": row["id"],
            "attempt": 1,
            "available_at": row["created_at"] + (lease if row["pool"] in direct else 0.0),
        }
        for row in new
    ]
    if not direct:
        await session.execute(insert(Outbox), outbox)
        accepted.relayed = True
        return
    outbox_ids = await session.scalars(
        insert(Outbox).returning(Outbox.id, sort_by_parameter_order=True), outbox
    )
    for row, outbox_id in zip(new, outbox_ids, strict=True):
        if row["pool"] in direct:
            accepted.direct.append(Due.first_attempt(row, outbox_id))
        else:
            accepted.relayed = True


async def _direct_pools(session: AsyncSession, pools: set[str]) -> set[str]:
    """Those of ``pools`` whose new tasks may be published at once: not draining, no limit.
    Read in the submit's transaction, so a drain committed before it is seen."""
    found = await session.scalars(
        select(Pool.name).where(
            Pool.name.in_(pools), Pool.draining.is_(False), Pool.max_running.is_(None)
        )
    )
    return set(found)


async def _load_task(session: AsyncSession, task_id: str, *, for_update: bool = False) -> Task:
    query = select(Task).where(Task.id == task_id)
    if for_update:
        query = query.with_for_update()
    task = await session.scalar(query)
    if task is None:
        raise NotFound(f"unknown task {task_id!r}: list tasks with `rexec tasks`")
    return task


async def get_task(rt: Runtime, task_id: str) -> TaskView:
    async with rt.sessions() as session:
        return task_view(await _load_task(session, task_id))


async def wait_task(rt: Runtime, task_id: str, wait: float) -> TaskView:
    """The task once terminal, or as it is when ``wait`` seconds (at most 60) ran out."""
    deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT)
    while True:
        # Take the event before reading, so a commit between the read and the wait wakes us.
        applied = rt.events_applied
        view = await get_task(rt, task_id)
        remaining = deadline - time.monotonic()
        if view.state.terminal or remaining <= 0:
            return view
        with anyio.move_on_after(min(remaining, WAIT_RECHECK)):
            await applied.wait()


WAIT_CHUNK = 500
"""Ids per ``IN (...)`` query, well under every database's parameter limit."""
BATCH_RECHECK = 0.1
"""Seconds between looks when a wait covers more than one chunk of ids."""


async def wait_tasks(rt: Runtime, task_ids: Sequence[str], wait: float) -> list[TaskView]:
    """Many tasks once all are terminal, or as they are when ``wait`` (at most 60 s) ran out.

    While waiting, only the states of the tasks still pending are read, so waiting on
    thousands of tasks costs a few small queries per commit of the events consumer.
    """
    if len(task_ids) > MAX_LIST_LIMIT:
        raise Invalid(f"wait takes at most {MAX_LIST_LIMIT} ids per request, got {len(task_ids)}")
    deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT)
    terminal = [s.value for s in TERMINAL_STATES]
    pending = set(task_ids)
    while pending:
        applied = rt.events_applied
        async with rt.sessions() as session:
            known: set[str] = set()
            for chunk in _chunks(sorted(pending), WAIT_CHUNK):
                rows = await session.execute(select(Task.id, Task.state).where(Task.id.in_(chunk)))
                for task_id, state in rows:
                    known.add(task_id)
                    if state in terminal:
                        pending.discard(task_id)
        if missing := pending - known:
            raise NotFound(f"unknown task {sorted(missing)[0]!r}: list tasks with `rexec tasks`")
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            break
        with anyio.move_on_after(min(remaining, WAIT_RECHECK)):
            await applied.wait()
        # Many pending tasks: look again at most every BATCH_RECHECK, not at every commit.
        if len(pending) > WAIT_CHUNK:
            await anyio.sleep(min(BATCH_RECHECK, max(0.0, deadline - time.monotonic())))
    views: dict[str, TaskView] = {}
    async with rt.sessions() as session:
        for chunk in _chunks(list(dict.fromkeys(task_ids)), WAIT_CHUNK):
            for task in await session.scalars(select(Task).where(Task.id.in_(chunk))):
                views[task.id] = task_view(task)
    return [views[task_id] for task_id in task_ids]


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _state_filter(state: str) -> TaskState:
    try:
        return TaskState(state)
    except ValueError:
        choices = ", ".join(s.value for s in TaskState)
        raise Invalid(f"unknown task state {state!r}: use one of {choices}") from None


async def list_tasks(
    rt: Runtime,
    *,
    pool: str | None = None,
    state: str | None = None,
    idempotency_key: str | None = None,
    limit: int = 100,
) -> list[TaskView]:
    """Tasks, newest first, optionally of one pool, in one state and/or with one idempotency
    key (a restarted scheduler finds its tasks by key; the unique (pool, key) index serves it)."""
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise Invalid(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}")
    query = select(Task)
    if state is not None:
        query = query.where(Task.state == _state_filter(state).value)
    if idempotency_key is not None:
        query = query.where(Task.idempotency_key == idempotency_key)
    async with rt.sessions() as session:
        if pool is not None:
            await _check_pools(rt, session, [pool])
            query = query.where(Task.pool == pool)
        tasks = await session.scalars(
            query.order_by(Task.created_at.desc(), Task.id.desc()).limit(limit)
        )
        return [task_view(task) for task in tasks]


async def history(rt: Runtime, task_id: str) -> list[TaskHistoryEntry]:
    """The task's transitions, oldest first, starting with its submission."""
    async with rt.sessions() as session:
        task = await _load_task(session, task_id)
        rows = await session.scalars(
            select(TaskTransition)
            .where(TaskTransition.task_id == task_id)
            .order_by(TaskTransition.id)
        )
        entries = [
            TaskHistoryEntry(
                at=task.created_at,
                attempt=1,
                from_state=None,
                to_state=TaskState.QUEUED.value,
                agent_id=None,
                reason="submitted",
            )
        ]
        entries.extend(
            TaskHistoryEntry(
                at=row.at,
                attempt=row.attempt,
                from_state=row.from_state,
                to_state=row.to_state,
                agent_id=row.agent_id,
                reason=row.reason,
            )
            for row in rows
        )
        return entries


async def cancel(rt: Runtime, task_id: str) -> TaskView:
    """Cancel a task: at once if queued; through its agent if running; 409 if terminal."""
    now = time.time()
    control: messages.Control | None = None
    agent_id: str | None = None
    async with rt.sessions.begin() as session:
        task = await _load_task(session, task_id, for_update=True)
        decision = statemachine.on_cancel(transitions.snapshot(task))
        if isinstance(decision, statemachine.Reject):
            raise Conflict(f"task {task_id} is already {task.state}; there is nothing to cancel")
        # The marker is checked by an agent's claim, so a queued (or requeued) attempt never
        # starts even if its message was already published.
        await _mark_cancelled(rt, task.pool, task_id)
        if isinstance(decision, statemachine.Transition):
            transitions.apply(session, task, decision, now)
            await session.execute(delete(Outbox).where(Outbox.task_id == task_id))
        else:
            task.cancel_requested = True
            agent_id = decision.agent_id
            control = messages.Control(action="cancel", task_id=task.id, attempt=task.attempt)
        view = task_view(task)
    if control is None:
        rt.notify_applied()
    elif agent_id is not None:
        await rt.publish_control(agent_id, control)
    log.info(
        "cancel requested",
        extra={"task_id": task_id, "attempt": view.attempt, "agent_id": agent_id},
    )
    return view


async def _mark_cancelled(rt: Runtime, pool: str, task_id: str) -> None:
    try:
        await rt.redis.set(rt.keys.cancelled(pool, task_id), "1", ex=CANCEL_MARKER_TTL)
    except (RedisError, OSError) as exc:
        # The state machine still refuses the attempt if an agent starts it: it gets stopped.
        log.warning(
            "could not set the cancel marker in Redis",
            extra={"task_id": task_id, "error": str(exc)},
        )


# --- pools ------------------------------------------------------------------------------------


async def _load_pool(session: AsyncSession, name: str) -> Pool:
    pool = await session.get(Pool, name)
    if pool is None:
        raise _unknown_pool(name)
    return pool


async def _task_counts(session: AsyncSession, pool: str | None = None) -> dict[str, dict[str, int]]:
    query = select(Task.pool, Task.state, func.count()).group_by(Task.pool, Task.state)
    if pool is not None:
        query = query.where(Task.pool == pool)
    counts: dict[str, dict[str, int]] = {}
    for name, state, count in await session.execute(query):
        counts.setdefault(name, {})[state] = count
    return counts


def _check_max_running(value: int | None) -> None:
    if value is not None and value < 1:
        raise Invalid(
            f"max_running must be at least 1, got {value}: remove the limit with null "
            "(`rexec pool update NAME --unlimited`), or stop the pool with `rexec pool drain`"
        )


async def create_pool(rt: Runtime, body: PoolCreate) -> PoolView:
    try:
        validate_pool_name(body.name)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    _check_max_running(body.max_running)
    async with rt.sessions() as session:
        if await session.get(Pool, body.name) is not None:
            raise Conflict(f"pool {body.name!r} already exists")
    pool = Pool(
        name=body.name,
        description=body.description,
        draining=False,
        created_at=time.time(),
        max_running=body.max_running,
    )
    # Topology first (a pool row whose queue is missing would strand its tasks), and undone
    # when the row cannot be written: a failed create leaves nothing behind in the broker.
    existed = await topology.pool_declared(rt.connection, body.name)
    try:
        await rt.declare_pool(body.name)
        async with rt.sessions.begin() as session:
            session.add(pool)
    except IntegrityError:  # another request created it meanwhile: the queues are its own
        raise Conflict(f"pool {body.name!r} already exists") from None
    except Exception:
        if not existed:
            await _undeclare_pool(rt, body.name)
        raise
    log.info("pool created", extra={"pool": body.name})
    return _pool_view(pool)


async def _undeclare_pool(rt: Runtime, name: str) -> None:
    try:
        await topology.undeclare_pool(rt.connection, name)
    except BROKER_ERRORS as exc:
        log.warning(
            "could not delete the queues of a pool whose creation failed",
            extra={"pool": name, "error": repr(exc)},
        )


async def list_pools(rt: Runtime) -> list[PoolView]:
    async with rt.sessions() as session:
        pools = list(await session.scalars(select(Pool).order_by(Pool.name)))
        counts = await _task_counts(session)
    return [_pool_view(pool, counts.get(pool.name)) for pool in pools]


async def get_pool(rt: Runtime, name: str) -> PoolView:
    async with rt.sessions() as session:
        pool = await _load_pool(session, name)
        counts = await _task_counts(session, name)
    return _pool_view(pool, counts.get(name))


async def set_draining(rt: Runtime, name: str, draining: bool) -> PoolView:
    """Drain (stop publishing the pool's queued tasks) or resume it."""
    async with rt.sessions.begin() as session:
        pool = await _load_pool(session, name)
        pool.draining = draining
        counts = await _task_counts(session, name)
    if not draining:
        rt.wake_relay()
    log.info("pool drained" if draining else "pool resumed", extra={"pool": name})
    return _pool_view(pool, counts.get(name))


async def set_max_running(rt: Runtime, name: str, max_running: int | None) -> PoolView:
    """Change how many of the pool's tasks may run (or be sent to agents) at once."""
    _check_max_running(max_running)
    async with rt.sessions.begin() as session:
        pool = await _load_pool(session, name)
        pool.max_running = max_running
        counts = await _task_counts(session, name)
    rt.wake_relay()
    log.info("pool updated", extra={"pool": name, "max_running": max_running})
    return _pool_view(pool, counts.get(name))


# --- tokens -----------------------------------------------------------------------------------


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_token(rt: Runtime, body: TokenCreate) -> TokenCreated:
    if body.expires_in is not None and not body.expires_in > 0:
        raise Invalid(f"expires_in must be a positive number of seconds, got {body.expires_in}")
    now = time.time()
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = Token(
        id=uuid.uuid4().hex[:16],
        pool=body.pool,
        name=body.name,
        prefix=secret[:12],
        secret_hash=hash_secret(secret),
        created_at=now,
        last_used_at=None,
        expires_at=None if body.expires_in is None else now + body.expires_in,
        revoked_at=None,
    )
    async with rt.sessions.begin() as session:
        await _load_pool(session, body.pool)
        session.add(token)
    log.info("token created", extra={"pool": body.pool, "token_id": token.id})
    return TokenCreated(token=_token_view(token, now), secret=secret)


async def list_tokens(rt: Runtime, *, pool: str | None = None) -> list[TokenView]:
    query = select(Token).order_by(Token.created_at.desc())
    if pool is not None:
        query = query.where(Token.pool == pool)
    now = time.time()
    async with rt.sessions() as session:
        return [_token_view(token, now) for token in await session.scalars(query)]


async def revoke_token(rt: Runtime, token_id: str) -> TokenView:
    """Revoke a token (again revoking a revoked token changes nothing)."""
    now = time.time()
    async with rt.sessions.begin() as session:
        token = await session.get(Token, token_id)
        if token is None:
            raise NotFound(f"unknown token {token_id!r}: list tokens with `rexec token list`")
        if token.revoked_at is None:
            token.revoked_at = now
        agent_ids = list(await session.scalars(select(Agent.id).where(Agent.token_id == token_id)))
    cut = await credentials.withdraw(rt, agent_ids, f"token {token_id} revoked")
    log.info(
        "token revoked", extra={"pool": token.pool, "token_id": token_id, "agents_cut_off": cut}
    )
    return _token_view(token, now)


async def authenticate_agent(session: AsyncSession, authorization: str | None) -> Token:
    """The active token named by an ``Authorization: Bearer <secret>`` header, else 401."""
    how = "set REXEC_AGENT_TOKEN to a secret from `rexec token create --pool <pool>`"
    if not authorization:
        raise Unauthorized(f"missing agent token: {how}")
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise Unauthorized(f"the Authorization header must be 'Bearer <token>': {how}")
    digest = hash_secret(secret)
    token = await session.scalar(select(Token).where(Token.secret_hash == digest))
    if token is None or not hmac.compare_digest(token.secret_hash, digest):
        raise Unauthorized(f"unknown agent token: {how}")
    state = _token_state(token, time.time())
    if state != "active":
        raise Unauthorized(
            f"agent token {token.prefix}… (id {token.id}) is {state}: "
            f"create a new one with `rexec token create --pool {token.pool}`"
        )
    return token


def _check_log_url(url: str) -> str | None:
    """An agent's announced log URL: ``http(s)://host[:port][/path]``, or none."""
    if not url:
        return None
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or len(url) > 1000:
        raise Invalid(
            f"the agent's log URL {url[:200]!r} is not an http(s) URL: "
            "fix REXEC_AGENT_LOG_URL (or unset it to use the health port)"
        )
    return url.rstrip("/")


def agent_id_for(hostname: str) -> str:
    """``<sanitised hostname>-<8 hex>``: readable in RabbitMQ's queue list, and unique."""
    base = re.sub(r"[^a-z0-9-]+", "-", hostname.lower()).strip("-")[:40].strip("-")
    return f"{base or 'agent'}-{secrets.token_hex(4)}"


def check_protocol(major: int, minor: int) -> None:
    """Refuse an agent this dispatcher cannot work with, saying which side to upgrade."""
    ours = (messages.PROTOCOL_VERSION, messages.PROTOCOL_MINOR)
    oldest = (messages.PROTOCOL_VERSION, messages.OLDEST_AGENT_MINOR)
    if major in messages.SUPPORTED_VERSIONS and minor >= messages.OLDEST_AGENT_MINOR:
        return
    older = (major, minor) < oldest
    raise Invalid(
        f"agent speaks protocol {messages.protocol_name(major, minor)}, this orchestration "
        f"plane speaks {messages.protocol_name(*ours)} and accepts agents from "
        f"{messages.protocol_name(*oldest)}: upgrade "
        + ("the agent (its image or package)" if older else "the orchestration plane")
    )


async def register_agent(
    rt: Runtime, authorization: str | None, body: AgentRegister
) -> AgentRegistered:
    check_protocol(body.version, body.protocol_minor)
    async with rt.sessions() as session:
        token = await authenticate_agent(session, authorization)
    if token.pool != body.pool:
        raise Conflict(
            f"this token belongs to pool {token.pool} but the agent asked for pool {body.pool}"
        )
    log_url = _check_log_url(body.log_url)
    now = time.time()
    agent = Agent(
        id=agent_id_for(body.hostname),
        pool=body.pool,
        token_id=token.id,
        hostname=body.hostname,
        pid=body.pid,
        concurrency=body.concurrency,
        version=body.version,
        protocol_minor=body.protocol_minor,
        state="online",
        registered_at=now,
        last_seen_at=now,
        log_url=log_url,
    )
    await rt.declare_agent_queue(agent.id)
    scoped = None
    # An agent a minor version behind (1.0) knows no scoped credentials: it keeps its own.
    if rt.settings.agent_credentials == "scoped" and body.protocol_minor >= 1:
        try:
            scoped = await credentials.issue(rt, agent)
        except credentials.CredentialsError as exc:
            raise Unavailable(str(exc)) from None
    async with rt.sessions.begin() as session:
        session.add(agent)
        stored = await session.get(Token, token.id)
        if stored is not None:
            stored.last_used_at = now
        audit.add(
            session,
            actor_kind="token",
            actor_id=token.id,
            actor_name=token.name,
            action="agent.register",
            target=agent.id,
            detail={"pool": body.pool, "hostname": body.hostname, "pid": body.pid},
        )
    log.info(
        "agent registered",
        extra={
            "agent_id": agent.id,
            "pool": body.pool,
            "hostname": body.hostname,
            "protocol": messages.protocol_name(body.version, body.protocol_minor),
            "credentials": rt.settings.agent_credentials,
        },
    )
    return AgentRegistered(
        agent_id=agent.id,
        pool=body.pool,
        heartbeat_ttl=rt.settings.heartbeat_ttl,
        protocol_version=messages.PROTOCOL_VERSION,
        protocol_minor=messages.PROTOCOL_MINOR,
        credentials=scoped,
        signing_public_keys=rt.public_keys,
    )


# --- agents -----------------------------------------------------------------------------------


class _Heartbeat(msgspec.Struct):
    at: float | None = None
    running: int = 0


_heartbeat_decoder = msgspec.json.Decoder(_Heartbeat)


async def list_agents(rt: Runtime, *, pool: str | None = None) -> list[AgentView]:
    """Registered agents; ``online`` while their heartbeat key lives in Redis."""
    query = select(Agent).order_by(Agent.registered_at.desc())
    if pool is not None:
        query = query.where(Agent.pool == pool)
    async with rt.sessions() as session:
        agents = list(await session.scalars(query))
    if not agents:
        return []
    beats: list[bytes | str | None] | None
    try:
        beats = await rt.redis.mget([rt.keys.agent(agent.id) for agent in agents])
    except (RedisError, OSError) as exc:
        log.warning("could not read heartbeats from Redis", extra={"error": str(exc)})
        beats = None
    now = time.time()
    views = []
    for index, agent in enumerate(agents):
        raw = None if beats is None else beats[index]
        state, age, running = ("unknown" if beats is None else "offline"), None, 0
        if raw is not None:
            state = "online"
            try:
                beat = _heartbeat_decoder.decode(raw)
            except msgspec.DecodeError:
                beat = _Heartbeat()
            running = beat.running
            age = None if beat.at is None else max(0.0, now - beat.at)
        elif beats is not None and agent.state == "lost":
            state = "lost"
        views.append(
            AgentView(
                id=agent.id,
                pool=agent.pool,
                hostname=agent.hostname,
                pid=agent.pid,
                concurrency=agent.concurrency,
                state=state,
                registered_at=agent.registered_at,
                last_seen_at=agent.last_seen_at,
                heartbeat_age=age,
                running=running,
                log_url=agent.log_url or "",
            )
        )
    return views


# --- health -----------------------------------------------------------------------------------


async def unready(rt: Runtime) -> str | None:
    """Why this replica cannot serve now (None: it can): the database or the broker is away."""
    if not connection_up(rt.connection):
        return "RabbitMQ connection lost: reconnecting"
    try:
        with anyio.fail_after(READY_TIMEOUT):
            async with rt.sessions() as session:
                await session.execute(text("SELECT 1"))
    except (TimeoutError, SQLAlchemyError, OSError) as exc:
        return f"the database does not answer: {type(exc).__name__}: {exc}"
    return None
