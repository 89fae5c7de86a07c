"""The Remote Execution API over HTTP: a Litestar app around :mod:`dispatcher.service`.

Litestar decodes and encodes the msgspec structs of ``schemas.api`` natively and derives the
OpenAPI document (``/schema/openapi.json``) from them. Every error is an ``ErrorBody`` whose
``error`` says what was wrong; nothing the client did wrong becomes a 500.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Annotated, Any

from litestar import Litestar, Request, Response, Router, delete, get, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    SerializationException,
    ValidationException,
)
from litestar.handlers import HTTPRouteHandler
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody, QueryParameter
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_201_CREATED,
    HTTP_401_UNAUTHORIZED,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
)
from prometheus_client import CONTENT_TYPE_LATEST

from schemas import tracing
from schemas.api import (
    API_PREFIX,
    AgentRegister,
    AgentRegistered,
    AgentView,
    ErrorBody,
    LogGrant,
    PoolCreate,
    PoolView,
    SubmitBatch,
    SubmitBatchResult,
    SubmitTask,
    TaskHistoryEntry,
    TaskView,
    TokenCreate,
    TokenCreated,
    TokenView,
    WaitResult,
    WaitTasks,
)

from . import logaccess, service
from . import metrics as metrics_module
from .runtime import Runtime

log = logging.getLogger("rexec.api")

BODY_MARGIN = 64 * 1024
"""Room for the JSON around a task's arguments before the body itself is refused."""
BATCH_BODY_MIN = 64 * 1024 * 1024
WAIT_BODY = service.MAX_LIST_LIMIT * 64 + BODY_MARGIN
"""Room for the most ids one wait takes (a 32-character id, quotes and a comma each)."""

ERROR_STATUS: dict[type[service.ServiceError], int] = {
    service.NotFound: HTTP_404_NOT_FOUND,
    service.Conflict: HTTP_409_CONFLICT,
    service.Invalid: HTTP_422_UNPROCESSABLE_ENTITY,
    service.PayloadTooLarge: HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    service.Unauthorized: HTTP_401_UNAUTHORIZED,
}

_ERRORS = {
    404: ResponseSpec(ErrorBody, description="Something named in the request does not exist"),
    409: ResponseSpec(ErrorBody, description="The request conflicts with the current state"),
    422: ResponseSpec(ErrorBody, description="A value is unacceptable"),
}


# --- handlers (registered in create_app, which knows the body size limits) --------------------


async def submit_task(
    rt: NamedDependency[Runtime], data: JSONBody[SubmitTask], request: Request[Any, Any, Any]
) -> Response[TaskView]:
    """Submit a task. 201 when created; 200 when its idempotency key matched an existing task."""
    with tracing.parent_from(request.headers):
        view, created = await service.submit(rt, data)
    return Response(view, status_code=HTTP_201_CREATED if created else HTTP_200_OK)


async def submit_batch(
    rt: NamedDependency[Runtime], data: JSONBody[SubmitBatch], request: Request[Any, Any, Any]
) -> SubmitBatchResult:
    """Submit many tasks in one transaction; ids come back in order."""
    with tracing.parent_from(request.headers):
        return SubmitBatchResult(ids=await service.submit_batch(rt, data.tasks))


async def wait_tasks(rt: NamedDependency[Runtime], data: JSONBody[WaitTasks]) -> WaitResult:
    """Long-poll many tasks: returns once every one is terminal or ``wait`` (at most 60 s) ran out."""
    return WaitResult(tasks=await service.wait_tasks(rt, data.ids, data.wait))


async def list_tasks(
    rt: NamedDependency[Runtime],
    pool: FromQuery[str | None] = None,
    task_state: Annotated[
        str | None, QueryParameter(name="state", description="Only tasks in this state")
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=service.MAX_LIST_LIMIT)] = 100,
) -> list[TaskView]:
    """Tasks, newest first."""
    return await service.list_tasks(rt, pool=pool, state=task_state, limit=limit)


async def get_task(
    rt: NamedDependency[Runtime],
    task_id: FromPath[str],
    wait: Annotated[
        float | None,
        QueryParameter(
            ge=0,
            description="Long-poll: seconds (at most 60) to wait for the task to finish",
        ),
    ] = None,
) -> TaskView:
    """One task; with ``wait``, returns once it is terminal or the wait ran out."""
    if wait:
        return await service.wait_task(rt, task_id, wait)
    return await service.get_task(rt, task_id)


async def cancel_task(rt: NamedDependency[Runtime], task_id: FromPath[str]) -> TaskView:
    """Cancel a queued task at once, or ask the agent running it to stop it."""
    return await service.cancel(rt, task_id)


async def task_history(
    rt: NamedDependency[Runtime], task_id: FromPath[str]
) -> list[TaskHistoryEntry]:
    """The task's state transitions, oldest first."""
    return await service.history(rt, task_id)


async def log_grant(
    rt: NamedDependency[Runtime],
    task_id: FromPath[str],
    attempt: Annotated[
        int | None,
        QueryParameter(ge=1, description="The attempt (default: the latest that ran)"),
    ] = None,
) -> LogGrant:
    """Where an attempt's log is (it stays on its agent) and a grant, valid for a minute, to
    read it there: ``GET <log_url>/logs/<task_id>/<attempt>`` with ``Authorization: Bearer``."""
    return await logaccess.log_grant(rt, task_id, attempt)


async def create_pool(rt: NamedDependency[Runtime], data: JSONBody[PoolCreate]) -> PoolView:
    """Create a pool and its queue (``rexec.pool.<name>``)."""
    return await service.create_pool(rt, data)


async def list_pools(rt: NamedDependency[Runtime]) -> list[PoolView]:
    """Pools with their task counts by state."""
    return await service.list_pools(rt)


async def drain_pool(rt: NamedDependency[Runtime], name: FromPath[str]) -> PoolView:
    """Stop publishing the pool's queued tasks (they wait until the pool resumes)."""
    return await service.set_draining(rt, name, True)


async def resume_pool(rt: NamedDependency[Runtime], name: FromPath[str]) -> PoolView:
    """Publish the pool's tasks again."""
    return await service.set_draining(rt, name, False)


async def list_agents(
    rt: NamedDependency[Runtime], pool: FromQuery[str | None] = None
) -> list[AgentView]:
    """Registered agents, online while their heartbeat lives."""
    return await service.list_agents(rt, pool=pool)


async def register_agent(
    rt: NamedDependency[Runtime],
    data: JSONBody[AgentRegister],
    authorization: Annotated[
        str | None, HeaderParameter(name="Authorization", description="Bearer <agent token>")
    ] = None,
) -> AgentRegistered:
    """An agent starts: authenticate its token and give it an id and a control queue."""
    return await service.register_agent(rt, authorization, data)


async def create_token(rt: NamedDependency[Runtime], data: JSONBody[TokenCreate]) -> TokenCreated:
    """Create an agent token for a pool; the secret is in this response only."""
    return await service.create_token(rt, data)


async def list_tokens(
    rt: NamedDependency[Runtime], pool: FromQuery[str | None] = None
) -> list[TokenView]:
    """Agent tokens (never their secrets)."""
    return await service.list_tokens(rt, pool=pool)


async def revoke_token(rt: NamedDependency[Runtime], token_id: FromPath[str]) -> TokenView:
    """Revoke a token: agents can no longer register with it."""
    return await service.revoke_token(rt, token_id)


async def healthz(rt: NamedDependency[Runtime]) -> dict[str, str]:
    """200 while the API and its database answer."""
    return await service.health(rt)


async def metrics(rt: NamedDependency[Runtime]) -> Response[bytes]:
    """Prometheus metrics (text format): tasks, queue depth, agents, latencies, requeues."""
    body = await metrics_module.render(rt)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


# --- errors -----------------------------------------------------------------------------------


def _error(status: int, message: str, detail: Any = None) -> Response[ErrorBody]:
    return Response(ErrorBody(error=message, detail=detail), status_code=status)


def _on_service_error(_: Request[Any, Any, Any], exc: service.ServiceError) -> Response[ErrorBody]:
    return _error(
        ERROR_STATUS.get(type(exc), HTTP_422_UNPROCESSABLE_ENTITY), exc.message, exc.detail
    )


def _validation_message(exc: ValidationException) -> str:
    problems = []
    if isinstance(exc.extra, list):
        for item in exc.extra:
            if isinstance(item, dict) and item.get("message"):
                key = item.get("key")
                source = str(getattr(item.get("source"), "value", item.get("source")))
                text = str(item["message"])
                if source == "body" and key and key != "data":
                    text = f"{text} at field {key!r}"
                elif source != "body" and key:
                    text = f"{text} in {source} parameter {key!r}"
                problems.append(text)
    if not problems:
        return f"invalid request: {exc.detail}"
    return "invalid request: " + "; ".join(problems)


def _on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    if isinstance(exc, ValidationException):
        return _error(exc.status_code, _validation_message(exc))
    if isinstance(exc.__cause__, SerializationException):
        return _error(exc.status_code, f"the request body is not valid JSON: {exc.detail}")
    if exc.status_code == HTTP_413_REQUEST_ENTITY_TOO_LARGE:
        handler = request.scope.get("route_handler")
        limit = (
            handler.resolve_request_max_body_size()
            if isinstance(handler, HTTPRouteHandler)
            else None
        )
        return _error(
            exc.status_code,
            f"request body too large: the limit is {limit} bytes; task arguments may be at "
            "most REXEC_MAX_PAYLOAD_BYTES: pass a reference (a URL or object key) instead",
        )
    if exc.status_code == HTTP_404_NOT_FOUND and request.scope.get("route_handler") is None:
        return _error(
            exc.status_code,
            f"no such endpoint: {request.method} {request.url.path} (see /schema/openapi.json)",
        )
    return _error(exc.status_code, str(exc.detail))


def _on_internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    log.exception(
        "request failed",
        exc_info=exc,
        extra={"method": request.method, "path": request.url.path},
    )
    return _error(
        HTTP_500_INTERNAL_SERVER_ERROR,
        f"internal error ({type(exc).__name__}): see the dispatcher's log",
    )


def _api_key_guard(
    key: str,
) -> Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], None]:
    expected = f"Bearer {key}".encode()

    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if handler.opt.get("agent_auth"):
            return  # agents authenticate with their own token
        given = connection.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise NotAuthorizedException(
                "missing or wrong API key: send 'Authorization: Bearer <key>' "
                "(the client and CLI read it from REXEC_API_KEY)"
            )

    return guard


# --- the app ----------------------------------------------------------------------------------


def create_app(runtime: Runtime) -> Litestar:
    settings = runtime.settings
    task_body = settings.max_payload_bytes + BODY_MARGIN
    batch_body = max(BATCH_BODY_MIN, settings.max_payload_bytes * 16)

    def provide_runtime() -> Runtime:
        return runtime

    tags = ["tasks"]
    v1 = Router(
        path=API_PREFIX,
        guards=[_api_key_guard(settings.api_key)] if settings.api_key else [],
        route_handlers=[
            post(
                "/tasks",
                status_code=HTTP_201_CREATED,
                request_max_body_size=task_body,
                tags=tags,
                responses={
                    HTTP_200_OK: ResponseSpec(TaskView, description="Idempotency key matched"),
                    413: ResponseSpec(ErrorBody, description="Arguments too large"),
                    **_ERRORS,
                },
            )(submit_task),
            post(
                "/tasks/batch",
                status_code=HTTP_201_CREATED,
                request_max_body_size=batch_body,
                tags=tags,
            )(submit_batch),
            post(
                "/tasks/wait",
                status_code=HTTP_200_OK,
                request_max_body_size=WAIT_BODY,
                tags=tags,
            )(wait_tasks),
            get("/tasks", tags=tags)(list_tasks),
            get("/tasks/{task_id:str}", tags=tags, responses=_ERRORS)(get_task),
            post("/tasks/{task_id:str}/cancel", status_code=HTTP_200_OK, tags=tags)(cancel_task),
            get("/tasks/{task_id:str}/history", tags=tags)(task_history),
            post(
                "/tasks/{task_id:str}/log-grant",
                status_code=HTTP_200_OK,
                tags=tags,
                responses=_ERRORS,
            )(log_grant),
            post("/pools", status_code=HTTP_201_CREATED, tags=["pools"])(create_pool),
            get("/pools", tags=["pools"])(list_pools),
            post("/pools/{name:str}/drain", status_code=HTTP_200_OK, tags=["pools"])(drain_pool),
            post("/pools/{name:str}/resume", status_code=HTTP_200_OK, tags=["pools"])(resume_pool),
            get("/agents", tags=["agents"])(list_agents),
            post(
                "/agents/register",
                status_code=HTTP_201_CREATED,
                tags=["agents"],
                opt={"agent_auth": True},
                responses={401: ResponseSpec(ErrorBody, description="Bad agent token"), **_ERRORS},
            )(register_agent),
            post("/tokens", status_code=HTTP_201_CREATED, tags=["tokens"])(create_token),
            get("/tokens", tags=["tokens"])(list_tokens),
            delete("/tokens/{token_id:str}", status_code=HTTP_200_OK, tags=["tokens"])(
                revoke_token
            ),
        ],
    )
    return Litestar(
        route_handlers=[
            v1,
            get("/healthz", tags=["health"])(healthz),
            get("/metrics", tags=["health"], include_in_schema=False)(metrics),
        ],
        dependencies={"rt": Provide(provide_runtime, sync_to_thread=False)},
        exception_handlers={
            service.ServiceError: _on_service_error,
            HTTPException: _on_http_error,
            Exception: _on_internal_error,
        },
        request_max_body_size=task_body,
        openapi_config=OpenAPIConfig(
            title="rexec Remote Execution API",
            version="1.0.0",
            description="Submit tasks to agent pools, follow them, and manage pools, "
            "agents and agent tokens.",
        ),
        logging_config=None,
        debug=False,
    )
