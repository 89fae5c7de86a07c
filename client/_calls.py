"""The client without I/O: each verb is a :class:`Call` (request plus decoder), shared by the
sync and async clients so both speak exactly the same API."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from rexec.schemas import tls
from rexec.schemas.api import (
    API_PREFIX,
    AgentView,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyView,
    AuditEntry,
    ErrorBody,
    LogGrant,
    PoolCreate,
    PoolUpdate,
    PoolView,
    Principal,
    Role,
    SubmitBatch,
    SubmitBatchResult,
    SubmitTask,
    TaskChanges,
    TaskHistoryEntry,
    TaskView,
    TokenCreate,
    TokenCreated,
    TokenView,
    WaitResult,
    WaitTasks,
)

T = TypeVar("T")
Param = str | int | float | Sequence[str]
"""A query parameter's value; a sequence repeats the parameter (``?pool=a&pool=b``)."""

MAX_WAIT = 60.0
"""The server's longest long-poll; longer waits are several polls."""
BATCH_CHUNK = 5000
"""Tasks per ``/tasks/batch`` request in ``submit_many``."""
DEFAULT_TIMEOUT = 30.0

_encoder = msgspec.json.Encoder()
_error_decoder = msgspec.json.Decoder(ErrorBody)


class RexecError(Exception):
    """The API refused a request (``status`` is its HTTP status) or could not be reached
    (``status`` is None). ``message`` is the server's explanation."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message if status is None else f"{message} (HTTP {status})")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    decode: Callable[[bytes], T]
    params: Mapping[str, Param] = field(default_factory=dict)
    body: bytes | None = None
    timeout: float | None = None
    """Seconds to wait for the answer, when longer than usual (long-polls)."""
    replayable: bool | None = None
    """Sending it twice does what sending it once does (None: only a GET is): a call the
    connection failed under is sent again."""

    @property
    def may_resend(self) -> bool:
        return self.method == "GET" if self.replayable is None else self.replayable

    def request(self, client: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        headers = {"content-type": "application/json"} if self.body is not None else {}
        extensions = {}
        if self.timeout is not None:
            extensions["timeout"] = httpx.Timeout(self.timeout).as_dict()
        return client.build_request(
            self.method,
            self.path,
            params=dict(self.params),
            content=self.body,
            headers=headers,
            extensions=extensions,
        )

    def result(self, response: httpx.Response) -> T:
        if response.is_success:
            return self.decode(response.content)
        raise error_from(response)


RESEND_DELAYS = (0.05, 0.25)
"""Seconds before each new send of a call whose connection failed (one per retry)."""


def resend_delay(call: Call[Any], exc: httpx.TransportError, sent: int) -> float | None:
    """Seconds to wait before sending ``call`` again after ``exc`` on its ``sent``-th send;
    None: raise. A keep-alive connection the server closed as the request left, or one reset
    under load, fails a call that would succeed on a fresh one. A call that may have reached
    the server is sent again only if it is replayable (a read, a submit with an idempotency
    key); one that failed to connect reached nothing. Timeouts are not retried: the server is
    slow, and a second send would only add to its load."""
    if sent > len(RESEND_DELAYS) or isinstance(exc, httpx.TimeoutException):
        return None
    if tls.certificate_problem(exc) is not None:
        return None
    if not (call.may_resend or isinstance(exc, httpx.ConnectError)):
        return None
    return RESEND_DELAYS[sent - 1]


def error_from(response: httpx.Response) -> RexecError:
    try:
        message = _error_decoder.decode(response.content).error
    except msgspec.DecodeError:
        message = response.text.strip() or response.reason_phrase
    return RexecError(response.status_code, message)


def unreachable(base_url: str, exc: httpx.TransportError) -> RexecError:
    problem = tls.certificate_problem(exc)
    if problem is not None:  # not "unreachable": the server answered with a certificate we refuse
        return RexecError(None, tls.describe(problem, "api", f"the rexec API at {base_url}"))
    if isinstance(exc, httpx.TimeoutException):
        return RexecError(
            None, f"the rexec API at {base_url} did not answer in time ({type(exc).__name__})"
        )
    return RexecError(
        None,
        f"the rexec API at {base_url} is unreachable ({exc or type(exc).__name__}): "
        "start it with `rexec serve`, or point REXEC_API_URL (--api-url) at it",
    )


def _decoder(kind: Any) -> Callable[[bytes], Any]:
    return msgspec.json.Decoder(kind).decode


_task = _decoder(TaskView)
_tasks = _decoder(list[TaskView])
_history = _decoder(list[TaskHistoryEntry])
_pool = _decoder(PoolView)
_pools = _decoder(list[PoolView])
_token = _decoder(TokenView)
_tokens = _decoder(list[TokenView])
_token_created = _decoder(TokenCreated)
_agents = _decoder(list[AgentView])
_batch = _decoder(SubmitBatchResult)
_wait_result = _decoder(WaitResult)
_changes = _decoder(TaskChanges)
_health = _decoder(dict[str, str])
_api_key = _decoder(ApiKeyView)
_api_keys = _decoder(list[ApiKeyView])
_api_key_created = _decoder(ApiKeyCreated)
_principal = _decoder(Principal)
_audit = _decoder(list[AuditEntry])


def _text(body: bytes) -> str:
    return body.decode("utf-8", errors="replace")


_log_grant = _decoder(LogGrant)


def _v1(*segments: str) -> str:
    """An API path; segments from the user (ids, names) are escaped."""
    return API_PREFIX + "".join("/" + quote(s, safe="") for s in segments)


def _params(**values: Param | None) -> dict[str, Param]:
    return {k: v for k, v in values.items() if v is not None}


def submit(body: SubmitTask) -> Call[TaskView]:
    return Call(
        "POST",
        _v1("tasks"),
        _task,
        body=_encoder.encode(body),
        replayable=body.idempotency_key is not None,
    )


def submit_batch(tasks: Sequence[SubmitTask]) -> Call[SubmitBatchResult]:
    return Call(
        "POST",
        _v1("tasks", "batch"),
        _batch,
        body=_encoder.encode(SubmitBatch(tasks=list(tasks))),
        replayable=all(task.idempotency_key is not None for task in tasks),
    )


WAIT_CHUNK = 10_000
"""Ids per ``/tasks/wait`` request (the server's limit)."""


def wait_many(task_ids: Sequence[str], deadline: float | None) -> Call[WaitResult]:
    wait = poll_wait(deadline)
    body = _encoder.encode(WaitTasks(ids=list(task_ids), wait=wait))
    return Call(
        "POST",
        _v1("tasks", "wait"),
        _wait_result,
        body=body,
        timeout=wait + DEFAULT_TIMEOUT,
        replayable=True,
    )


def get(task_id: str, wait: float | None = None) -> Call[TaskView]:
    if wait is None or wait <= 0:
        return Call("GET", _v1("tasks", task_id), _task)
    wait = min(wait, MAX_WAIT)
    return Call(
        "GET", _v1("tasks", task_id), _task, params={"wait": wait}, timeout=wait + DEFAULT_TIMEOUT
    )


def list_tasks(
    pool: str | None, state: str | None, limit: int, idempotency_key: str | None = None
) -> Call[list[TaskView]]:
    params = _params(pool=pool, state=state, idempotency_key=idempotency_key, limit=limit)
    return Call("GET", _v1("tasks"), _tasks, params=params)


def changes(after: int | None, pools: Sequence[str], wait: float, limit: int) -> Call[TaskChanges]:
    """The change feed; its read timeout outlasts the long-poll (``wait``, at most 60 s)."""
    wait = min(max(wait, 0.0), MAX_WAIT)
    params = _params(after=after, pool=list(pools) or None, wait=wait or None, limit=limit)
    return Call(
        "GET", _v1("tasks", "changes"), _changes, params=params, timeout=wait + DEFAULT_TIMEOUT
    )


def cancel(task_id: str) -> Call[TaskView]:
    return Call("POST", _v1("tasks", task_id, "cancel"), _task)


def history(task_id: str) -> Call[list[TaskHistoryEntry]]:
    return Call("GET", _v1("tasks", task_id, "history"), _history)


def log_grant(task_id: str, attempt: int | None) -> Call[LogGrant]:
    return Call(
        "POST", _v1("tasks", task_id, "log-grant"), _log_grant, params=_params(attempt=attempt)
    )


def create_pool(name: str, description: str, max_running: int | None = None) -> Call[PoolView]:
    body = PoolCreate(name=name, description=description, max_running=max_running)
    return Call("POST", _v1("pools"), _pool, body=_encoder.encode(body))


def update_pool(name: str, max_running: int | None) -> Call[PoolView]:
    body = PoolUpdate(max_running=max_running)
    return Call("PATCH", _v1("pools", name), _pool, body=_encoder.encode(body))


def list_pools() -> Call[list[PoolView]]:
    return Call("GET", _v1("pools"), _pools)


def drain_pool(name: str) -> Call[PoolView]:
    return Call("POST", _v1("pools", name, "drain"), _pool)


def resume_pool(name: str) -> Call[PoolView]:
    return Call("POST", _v1("pools", name, "resume"), _pool)


def create_token(pool: str, name: str, expires_in: float | None) -> Call[TokenCreated]:
    body = TokenCreate(pool=pool, name=name, expires_in=expires_in)
    return Call("POST", _v1("tokens"), _token_created, body=_encoder.encode(body))


def list_tokens(pool: str | None) -> Call[list[TokenView]]:
    return Call("GET", _v1("tokens"), _tokens, params=_params(pool=pool))


def revoke_token(token_id: str) -> Call[TokenView]:
    return Call("DELETE", _v1("tokens", token_id), _token)


def create_api_key(role: Role, name: str, expires_in: float | None) -> Call[ApiKeyCreated]:
    body = ApiKeyCreate(role=role, name=name, expires_in=expires_in)
    return Call("POST", _v1("apikeys"), _api_key_created, body=_encoder.encode(body))


def list_api_keys() -> Call[list[ApiKeyView]]:
    return Call("GET", _v1("apikeys"), _api_keys)


def revoke_api_key(key_id: str) -> Call[ApiKeyView]:
    return Call("DELETE", _v1("apikeys", key_id), _api_key)


def login() -> Call[Principal]:
    return Call("POST", _v1("login"), _principal)


def audit(limit: int) -> Call[list[AuditEntry]]:
    return Call("GET", _v1("audit"), _audit, params={"limit": limit})


def list_agents(pool: str | None) -> Call[list[AgentView]]:
    return Call("GET", _v1("agents"), _agents, params=_params(pool=pool))


def health() -> Call[dict[str, str]]:
    return Call("GET", "/healthz", _health)


def metrics() -> Call[str]:
    """The dispatcher's Prometheus metrics, in the text format (for ``rexec top``)."""
    return Call("GET", "/metrics", _text)


def submit_body(
    pool: str,
    target: str | None,
    command: Sequence[str] | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    timeout: float | None,
    max_attempts: int | None,
    retry_backoff: float | None,
    expires_in: float | None,
    idempotency_key: str | None,
    secrets: Sequence[str] = (),
    sensitive: bool = False,
    final_exit_codes: Sequence[int] = (),
) -> SubmitTask:
    return SubmitTask(
        pool=pool,
        target=target,
        command=None if command is None else list(command),
        args=list(args),
        kwargs=dict(kwargs or {}),
        timeout=timeout,
        max_attempts=max_attempts,
        retry_backoff=retry_backoff,
        expires_in=expires_in,
        idempotency_key=idempotency_key,
        secrets=list(secrets),
        sensitive=sensitive,
        final_exit_codes=list(final_exit_codes),
    )


def poll_wait(deadline: float | None) -> float:
    """Seconds to ask the server to hold the next long-poll."""
    if deadline is None:
        return MAX_WAIT
    return max(0.0, min(MAX_WAIT, deadline - time.monotonic()))


def merge_waited(views: dict[str, TaskView], waited: WaitResult) -> list[str]:
    """Record the views of one ``/tasks/wait`` answer; return the ids still not terminal."""
    for view in waited.tasks:
        views[view.id] = view
    return [view.id for view in waited.tasks if not view.state.terminal]


def expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline
