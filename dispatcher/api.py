"""The Remote Execution API over HTTP: a Litestar app around :mod:`rexec.dispatcher.service`.

Litestar decodes and encodes the msgspec structs of ``rexec.schemas.api`` natively and derives the
OpenAPI document (``/schema/openapi.json``) from them. Every error is an ``ErrorBody`` whose
``error`` says what was wrong; nothing the client did wrong becomes a 500.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request, Response, Router, delete, get, patch, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import (
    ClientException,
    HTTPException,
    SerializationException,
    ValidationException,
)
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    Reference,
    Schema,
)
from litestar.params import (
    FromPath,
    FromQuery,
    HeaderParameter,
    JSONBody,
    KwargDefinition,
    QueryParameter,
)
from litestar.routes import HTTPRoute
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_201_CREATED,
    HTTP_401_UNAUTHORIZED,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_415_UNSUPPORTED_MEDIA_TYPE,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_429_TOO_MANY_REQUESTS,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from rexec.schemas import api as api_schemas
from rexec.schemas import tracing
from rexec.schemas.api import (
    API_PREFIX,
    INT32_MAX,
    MAX_CHANGES,
    AgentRegister,
    AgentRegistered,
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

from . import apikeys, audit, auth, changes, gauges, logaccess, outages, service
from .nesting import MAX_BODY_DEPTH, text_deeper_than
from .ratelimit import RateLimited, SubmitLimiter
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
    service.Unavailable: HTTP_503_SERVICE_UNAVAILABLE,
    RateLimited: HTTP_429_TOO_MANY_REQUESTS,
}

ERROR_DESCRIPTIONS = {
    400: "The body is not JSON, nested too deeply or malformed, or a parameter is invalid",
    401: "No API key, or an unknown, revoked or expired one",
    403: "The API key's role is not enough",
    404: "Something named in the request does not exist",
    409: "The request conflicts with the current state",
    413: "The body is larger than this operation takes",
    415: "The body is not declared application/json",
    422: "A value is unacceptable (out of range, or one the database cannot store)",
    429: "Submission rate limit: retry after Retry-After seconds",
    503: "A dependency is unavailable: retry later",
}
"""Every error status an operation may answer, with its ``ErrorBody``; see ``describe_errors``."""


# --- request bodies ---------------------------------------------------------------------------


class JsonRequest(Request[Any, Any, Any]):
    """A request whose JSON body is checked before it is decoded.

    Every route with a body decodes it through ``json()``: a body declared as anything but
    JSON is refused (415) rather than taken for JSON, and a body nested deeper than
    ``MAX_BODY_DEPTH`` is refused (400) before its decoding recurses into a RecursionError."""

    async def json(self) -> Any:
        media_type = self.content_type[0]
        if media_type and not _is_json(media_type):
            raise ClientException(
                f"the request body is declared {media_type!r}: this endpoint takes JSON; "
                "send it with 'Content-Type: application/json'",
                status_code=HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            )
        if text_deeper_than(await self.body(), MAX_BODY_DEPTH):
            raise ClientException(
                f"the request body is nested more than {MAX_BODY_DEPTH} levels deep (arrays "
                "and objects): flatten it, or pass a reference (a URL or object key) to the data"
            )
        return await super().json()


def _is_json(media_type: str) -> bool:
    """``application/json`` or a JSON-based type (``application/<something>+json``)."""
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


# --- handlers (registered in create_app, which knows the body size limits) --------------------
#
# ``caller`` is the principal of the request's API key (the guard in ``auth`` checked it);
# ``limiter`` is the submission rate limit. Operator actions are written to the audit log
# once they succeeded.


async def submit_task(
    rt: NamedDependency[Runtime],
    caller: NamedDependency[Principal],
    limiter: NamedDependency[SubmitLimiter],
    data: JSONBody[SubmitTask],
    request: Request[Any, Any, Any],
) -> Response[TaskView]:
    """Submit a task. 201 when created; 200 when its idempotency key matched an existing task."""
    limiter.take(caller.id)
    with tracing.parent_from(request.headers):
        view, created = await service.submit(rt, data)
    view = service.shown_to(caller.role, view)
    return Response(view, status_code=HTTP_201_CREATED if created else HTTP_200_OK)


async def submit_batch(
    rt: NamedDependency[Runtime],
    caller: NamedDependency[Principal],
    limiter: NamedDependency[SubmitLimiter],
    data: JSONBody[SubmitBatch],
    request: Request[Any, Any, Any],
) -> SubmitBatchResult:
    """Submit many tasks in one transaction; ids come back in order."""
    limiter.take(caller.id, len(data.tasks))
    with tracing.parent_from(request.headers):
        return SubmitBatchResult(ids=await service.submit_batch(rt, data.tasks))


async def wait_tasks(
    rt: NamedDependency[Runtime], caller: NamedDependency[Principal], data: JSONBody[WaitTasks]
) -> WaitResult:
    """Long-poll many tasks: returns once every one is terminal or ``wait`` (at most 60 s) ran out."""
    views = await service.wait_tasks(rt, data.ids, data.wait)
    return WaitResult(tasks=[service.shown_to(caller.role, view) for view in views])


async def list_tasks(
    rt: NamedDependency[Runtime],
    caller: NamedDependency[Principal],
    pool: FromQuery[str | None] = None,
    task_state: Annotated[
        str | None, QueryParameter(name="state", description="Only tasks in this state")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        QueryParameter(
            min_length=1,
            max_length=service.IDEMPOTENCY_KEY_MAX,
            description="Only the task submitted with this idempotency key (per pool)",
        ),
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=service.MAX_LIST_LIMIT)] = 100,
) -> list[TaskView]:
    """Tasks, newest first."""
    views = await service.list_tasks(
        rt, pool=pool, state=task_state, idempotency_key=idempotency_key, limit=limit
    )
    return [service.shown_to(caller.role, view) for view in views]


async def task_changes(
    rt: NamedDependency[Runtime],
    after: Annotated[
        int | None,
        QueryParameter(
            ge=0,
            le=INT32_MAX,
            description="Changes after this sequence number (a previous answer's cursor); "
            "omitted: none, and the cursor to start from",
        ),
    ] = None,
    pool: Annotated[
        list[str] | None,
        QueryParameter(description="Only tasks of this pool (repeat for several)"),
    ] = None,
    wait: Annotated[
        float,
        QueryParameter(
            ge=0,
            le=service.MAX_WAIT,
            description="Long-poll: seconds (at most 60) to wait for a change",
        ),
    ] = 0.0,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_CHANGES)] = changes.DEFAULT_LIMIT,
) -> TaskChanges:
    """Task state changes after ``after``, oldest first: a scheduler follows many tasks
    without polling each. With PostgreSQL a change may commit after a later one was read
    (and be skipped): reconcile now and then with ``POST /v1/tasks/wait`` and ``wait=0``."""
    return await changes.changes(rt, after=after, pools=pool or (), wait=wait, limit=limit)


async def get_task(
    rt: NamedDependency[Runtime],
    caller: NamedDependency[Principal],
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
        view = await service.wait_task(rt, task_id, wait)
    else:
        view = await service.get_task(rt, task_id)
    return service.shown_to(caller.role, view)


async def cancel_task(
    rt: NamedDependency[Runtime], caller: NamedDependency[Principal], task_id: FromPath[str]
) -> TaskView:
    """Cancel a queued task at once, or ask the agent running it to stop it."""
    view = await service.cancel(rt, task_id)
    found = "queued" if view.state.value == "cancelled" else view.state.value
    await audit.record(
        rt,
        caller,
        audit.CANCEL,
        task_id,
        {"attempt": view.attempt, "state": found, "agent_id": view.agent_id},
    )
    return service.shown_to(caller.role, view)


async def task_history(
    rt: NamedDependency[Runtime], task_id: FromPath[str]
) -> list[TaskHistoryEntry]:
    """The task's state transitions, oldest first, with the cancel requests and who made them."""
    entries = await service.history(rt, task_id)
    async with rt.sessions() as session:
        return audit.merge_history(entries, await audit.cancel_entries(session, task_id))


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


async def create_pool(
    rt: NamedDependency[Runtime], caller: NamedDependency[Principal], data: JSONBody[PoolCreate]
) -> PoolView:
    """Create a pool and its queue (``rexec.pool.<name>``)."""
    view = await service.create_pool(rt, data)
    await audit.record(rt, caller, "pool.create", view.name, {"max_running": view.max_running})
    return view


async def list_pools(rt: NamedDependency[Runtime]) -> list[PoolView]:
    """Pools with their task counts by state."""
    return await service.list_pools(rt)


async def update_pool(
    rt: NamedDependency[Runtime],
    caller: NamedDependency[Principal],
    name: FromPath[str],
    data: JSONBody[PoolUpdate],
) -> PoolView:
    """Change a pool's limit of running tasks (null: no limit)."""
    view = await service.set_max_running(rt, name, data.max_running)
    await audit.record(rt, caller, "pool.update", name, {"max_running": view.max_running})
    return view


async def drain_pool(
    rt: NamedDependency[Runtime], caller: NamedDependency[Principal], name: FromPath[str]
) -> PoolView:
    """Stop publishing the pool's queued tasks (they wait until the pool resumes)."""
    view = await service.set_draining(rt, name, True)
    await audit.record(rt, caller, "pool.drain", name)
    return view


async def resume_pool(
    rt: NamedDependency[Runtime], caller: NamedDependency[Principal], name: FromPath[str]
) -> PoolView:
    """Publish the pool's tasks again."""
    view = await service.set_draining(rt, name, False)
    await audit.record(rt, caller, "pool.resume", name)
    return view


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


async def create_token(
    rt: NamedDependency[Runtime], caller: NamedDependency[Principal], data: JSONBody[TokenCreate]
) -> TokenCreated:
    """Create an agent token for a pool; the secret is in this response only."""
    created = await service.create_token(rt, data)
    token = created.token
    await audit.record(
        rt,
        caller,
        "token.create",
        token.id,
        {"pool": token.pool, "name": token.name, "expires_at": token.expires_at},
    )
    return created


async def list_tokens(
    rt: NamedDependency[Runtime], pool: FromQuery[str | None] = None
) -> list[TokenView]:
    """Agent tokens (never their secrets)."""
    return await service.list_tokens(rt, pool=pool)


async def revoke_token(
    rt: NamedDependency[Runtime], caller: NamedDependency[Principal], token_id: FromPath[str]
) -> TokenView:
    """Revoke a token: agents can no longer register with it."""
    token = await service.revoke_token(rt, token_id)
    await audit.record(rt, caller, "token.revoke", token.id, {"pool": token.pool})
    return token


async def create_api_key(
    rt: NamedDependency[Runtime],
    caller: NamedDependency[Principal],
    data: JSONBody[ApiKeyCreate],
) -> ApiKeyCreated:
    """Create an operator API key with a role; the secret is in this response only."""
    created = await apikeys.create(rt, data)
    key = created.key
    await audit.record(
        rt,
        caller,
        "apikey.create",
        key.id,
        {"name": key.name, "role": key.role.value, "expires_at": key.expires_at},
    )
    return created


async def list_api_keys(rt: NamedDependency[Runtime]) -> list[ApiKeyView]:
    """Operator API keys (never their secrets)."""
    return await apikeys.list_keys(rt)


async def revoke_api_key(
    rt: NamedDependency[Runtime], caller: NamedDependency[Principal], key_id: FromPath[str]
) -> ApiKeyView:
    """Revoke an API key: refused from the next request on."""
    key = await apikeys.revoke(rt, key_id)
    await audit.record(rt, caller, "apikey.revoke", key.id, {"name": key.name})
    return key


async def login(rt: NamedDependency[Runtime], caller: NamedDependency[Principal]) -> Principal:
    """Check an API key (``rexec login``): who it belongs to and its role. Audited."""
    await audit.record(rt, caller, "login", caller.id)
    return caller


async def list_audit(
    rt: NamedDependency[Runtime],
    limit: Annotated[int, QueryParameter(ge=1, le=audit.MAX_LIMIT)] = 100,
) -> list[AuditEntry]:
    """The audit log, newest first: token, API-key and operator actions, with who and when."""
    return await audit.list_entries(rt, limit)


async def healthz() -> dict[str, str]:
    """200 while the process serves requests: the liveness probe. It looks at no dependency,
    so a database or broker outage does not get every replica restarted."""
    return {"status": "ok"}


async def readyz(rt: NamedDependency[Runtime]) -> Response[dict[str, str]]:
    """200 while the database answers and the broker connection is up: the readiness probe
    (503 with the reason otherwise, and the replica gets no traffic until it is back)."""
    problem = await service.unready(rt)
    if problem is None:
        return Response({"status": "ok"})
    return Response({"status": "unready", "reason": problem}, status_code=503)


async def metrics(rt: NamedDependency[Runtime]) -> Response[bytes]:
    """Prometheus metrics (text format): tasks, queue depth, agents, latencies, requeues."""
    body = await gauges.render(rt)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


# --- errors -----------------------------------------------------------------------------------


def _error(status: int, message: str, detail: Any = None) -> Response[ErrorBody]:
    return Response(ErrorBody(error=message, detail=detail), status_code=status)


def _on_service_error(_: Request[Any, Any, Any], exc: service.ServiceError) -> Response[ErrorBody]:
    response = _error(
        ERROR_STATUS.get(type(exc), HTTP_422_UNPROCESSABLE_ENTITY), exc.message, exc.detail
    )
    if isinstance(exc, RateLimited):
        response.headers["Retry-After"] = str(int(exc.retry_after))
    return response


_CONSTRAINT = re.compile(
    r"^Expected `(?P<type>[^`]+)` (?P<length>of length )?(?P<op>>=|>|<=|<) (?P<bound>\S+)$"
)
"""A msgspec constraint that failed (``Expected `int` <= 100``), not a wrong type or field."""
_RULES = {">=": "at least", ">": "more than", "<=": "at most", "<": "less than"}
_UNITS = {"str": "characters long", "array": "items", "object": "entries"}


def _out_of_range(key: str, message: str) -> str | None:
    """``max_attempts must be at most 100`` for a failed constraint, else None."""
    match = _CONSTRAINT.match(message)
    if match is None:
        return None
    bound = re.sub(r"\.0$", "", match["bound"])
    if match["length"]:
        rule = f"{_RULES[match['op']]} {bound} {_UNITS.get(match['type'], 'long')}"
    elif match["op"] == ">" and bound == "0":
        rule = "positive"
    else:
        rule = f"{_RULES[match['op']]} {bound}"
    return f"{key or 'the body'} must be {rule}"


def _validation_error(exc: ValidationException) -> tuple[int, str]:
    """The status and message of a request that did not validate: 422 when every problem is
    a body value out of range (well-formed, but unacceptable), else 400."""
    problems = []
    all_out_of_range = True
    if isinstance(exc.extra, list):
        for item in exc.extra:
            if isinstance(item, dict) and item.get("message"):
                key = str(item.get("key") or "")
                source = str(getattr(item.get("source"), "value", item.get("source")))
                text = str(item["message"])
                bounded = _out_of_range(key, text) if source == "body" else None
                all_out_of_range = all_out_of_range and bounded is not None
                if bounded is not None:
                    text = bounded
                elif source == "body" and key and key != "data":
                    text = f"{text} at field {key!r}"
                elif source != "body" and key:
                    text = f"{text} in {source} parameter {key!r}"
                problems.append(text)
    if not problems:
        return exc.status_code, f"invalid request: {exc.detail}"
    status = HTTP_422_UNPROCESSABLE_ENTITY if all_out_of_range else exc.status_code
    return status, "invalid request: " + "; ".join(problems)


def _on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    """The ``ErrorBody`` of an HTTP error, keeping the headers it carries (405's ``Allow``)."""
    response = _http_error(request, exc)
    for name, value in (exc.headers or {}).items():
        if name not in response.headers:
            response.headers[name] = value
    return response


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    if isinstance(exc, ValidationException):
        return _error(*_validation_error(exc))
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
    response = _error(exc.status_code, str(exc.detail))
    if exc.status_code == HTTP_401_UNAUTHORIZED:
        response.headers["WWW-Authenticate"] = 'Bearer realm="rexec"'
    return response


_DATA_PROBLEMS = {
    "22021": "text may not contain NUL (\\u0000) characters: remove them",
    "22001": "a text is longer than its field allows: shorten it",
    "22003": "a number is out of range: see the bounds in /schema/openapi.json",
}
"""PostgreSQL's data exceptions (SQLSTATE class 22) that a value of the request caused."""


def _on_database_error(request: Request[Any, Any, Any], exc: DBAPIError) -> Response[ErrorBody]:
    """A value the database refused to store or compare (PostgreSQL: a NUL in a text, a text
    too long for its column): the request's fault, so a 422 that says which rule it broke."""
    if outages.database_outage(exc):
        return _on_database_outage(request, exc)
    code = getattr(exc.orig, "sqlstate", None)
    if not (isinstance(code, str) and code.startswith("22")):
        return _on_internal_error(request, exc)
    problem = _DATA_PROBLEMS.get(code) or str(exc.orig).rsplit(": ", 1)[-1]
    log.info(
        "the database refused a value of the request",
        extra={"method": request.method, "path": request.url.path, "sqlstate": code},
    )
    return _error(
        HTTP_422_UNPROCESSABLE_ENTITY, f"a value of the request cannot be stored: {problem}"
    )


def _on_database_outage(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    """The metadata database is away (a restart, a failover) or the request met another
    error that is none of its fault: a 503 saying so, which a client retries later."""
    if not outages.database_outage(exc):
        return _on_internal_error(request, exc)
    log.warning(
        "request refused: the database is unavailable",
        extra={"method": request.method, "path": request.url.path, "error": repr(exc)[:300]},
    )
    return _error(
        HTTP_503_SERVICE_UNAVAILABLE,
        f"the metadata database is unavailable ({type(exc).__name__}): retry in a few "
        "seconds (a submit retried with the same idempotency key is stored once)",
    )


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


# --- the app ----------------------------------------------------------------------------------


def _guarded(role: Role, *errors: int, **kwargs: Any) -> dict[str, Any]:
    """Route keyword arguments: the role it needs, and the error statuses its own logic may
    answer (``describe_errors`` adds those every route of its kind may answer)."""
    guard = auth.requires(role)
    return {**guard, "opt": {**guard["opt"], ERRORS_OPT: errors}, **kwargs}


QUERY_OPT = "query"
"""A route's ``opt`` key (set by ``describe_errors``): the query parameters it declares."""
QUERY_LISTS_OPT = "query_lists"
"""A route's ``opt`` key (set by ``describe_errors``): those declared as lists (repeatable)."""


async def check_query(request: Request[Any, Any, Any]) -> None:
    """Refuse (400) a query parameter the operation does not declare, as bodies refuse
    unknown fields, and one given twice unless it is declared a list: a misspelt filter
    (``?stat=running``) or a second ``?state=`` must not be silently ignored."""
    declared = request.route_handler.opt.get(QUERY_OPT)
    if declared is None:
        return
    query = request.query_params
    unknown = sorted(set(query) - declared)
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        raise ClientException(
            f"unknown query parameter {unknown[0]!r}: this endpoint takes {known}"
        )
    lists = request.route_handler.opt.get(QUERY_LISTS_OPT, frozenset())
    for name in sorted(declared - lists):
        if len(values := query.getall(name, [])) > 1:
            raise ClientException(
                f"query parameter {name!r} is given {len(values)} times: give it once"
            )


ERRORS_OPT = "errors"
"""A route's ``opt`` key: the error statuses its handler's own logic may answer."""


def describe_errors(app: Litestar) -> None:
    """Declare in the OpenAPI document every error status each operation may answer, each
    with the ``ErrorBody`` the exception handlers really send (not Litestar's default 400).

    Derived in one place from what the route is: a body may be malformed (400), too large
    (413), not JSON (415) or out of range (422); a query parameter may not parse (400); any
    value may be one the database cannot store (422: a NUL); a guarded route answers 401 and
    403. The route adds what its own logic answers (``opt["errors"]``: 404, 409, 429, 503)."""
    document = app.openapi_schema
    if document.components is None:
        document.components = Components()
    schemas = document.components.schemas
    schemas[ErrorBody.__name__] = ERROR_BODY_SCHEMA
    _forbid_unknown_fields(schemas)
    reference = Reference(ref="#/components/schemas/ErrorBody")
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        path_item = (document.paths or {}).get(route.path_format)
        if path_item is None:
            continue
        for handler in route.route_handlers:
            for method in handler.http_methods:
                operation = getattr(path_item, method.lower(), None)
                if not isinstance(operation, Operation):
                    continue
                _keep_bounds(handler, operation)
                query = [
                    p
                    for p in operation.parameters or []
                    if isinstance(p, Parameter) and p.param_in == "query"
                ]
                handler.opt[QUERY_OPT] = frozenset(p.name for p in query)
                handler.opt[QUERY_LISTS_OPT] = frozenset(p.name for p in query if _is_list(p))
                responses = operation.responses or {}
                responses.pop("400", None)  # Litestar's default, a body the handlers never send
                for status in sorted(_error_statuses(handler, operation)):
                    responses[str(status)] = OpenAPIResponse(
                        description=ERROR_DESCRIPTIONS[status],
                        content={"application/json": OpenAPIMediaType(schema=reference)},
                        headers=_ERROR_HEADERS.get(status),
                    )
                operation.responses = responses


ERROR_BODY_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    title="ErrorBody",
    description="Every error: what was wrong and, for some, details (any JSON, often null).",
    properties={
        "error": Schema(type=OpenAPIType.STRING, description="What was wrong, and what to do"),
        "detail": Schema(description="Details of the error (any JSON value), or null"),
    },
    required=["error"],
)
"""``ErrorBody`` as the error handlers send it: ``{"error": ..., "detail": ...}``."""


_ERROR_HEADERS: dict[int, dict[str, OpenAPIHeader | Reference]] = {
    401: {
        "WWW-Authenticate": OpenAPIHeader(
            schema=Schema(type=OpenAPIType.STRING), description="The scheme: Bearer"
        )
    },
    429: {
        "Retry-After": OpenAPIHeader(
            schema=Schema(type=OpenAPIType.INTEGER, minimum=0),
            description="Seconds until a submission is accepted again",
        )
    },
}


def _error_statuses(handler: HTTPRouteHandler, operation: Operation) -> set[int]:
    statuses = set(handler.opt.get(ERRORS_OPT, ()))
    parameters = operation.parameters or []
    if operation.request_body is not None:
        statuses |= {400, 413, 415, 422}
    if any(isinstance(p, Parameter) and p.param_in == "query" for p in parameters):
        statuses.add(400)
    if parameters:
        statuses.add(422)
    if "role" in handler.opt:
        statuses |= {401, 403}
    if handler.opt.get("agent_auth"):
        statuses.add(401)
    return statuses


def _is_list(parameter: Parameter) -> bool:
    """A query parameter whose schema is an array (alone or in a ``oneOf``): it may repeat."""
    schema = parameter.schema
    if not isinstance(schema, Schema):
        return False
    return any(
        isinstance(s, Schema) and s.type == OpenAPIType.ARRAY for s in (schema.one_of or [schema])
    )


def _keep_bounds(handler: HTTPRouteHandler, operation: Operation) -> None:
    """Put a parameter's bounds in its schema: Litestar drops a bound of 0 (``ge=0`` is falsy
    to it), and leaves an optional parameter's outside the ``oneOf`` that holds the number."""
    fields = handler.parsed_fn_signature.parameters.values()
    bounds = {}
    for field in fields:
        kwarg = field.kwarg_definition
        if isinstance(kwarg, KwargDefinition):
            name = getattr(kwarg, "query", None) or getattr(kwarg, "header", None) or field.name
            bounds[name] = kwarg
    for parameter in operation.parameters or []:
        kwarg = bounds.get(parameter.name) if isinstance(parameter, Parameter) else None
        if kwarg is None or not isinstance(parameter, Parameter):
            continue
        schema = parameter.schema
        if not isinstance(schema, Schema):
            continue
        numbers = [
            s
            for s in (schema.one_of or [schema])
            if isinstance(s, Schema) and s.type in (OpenAPIType.INTEGER, OpenAPIType.NUMBER)
        ]
        for number in numbers:
            for attribute, key in _BOUNDS.items():
                value = getattr(kwarg, attribute)
                if value is not None:
                    setattr(number, key, value)
        if schema.one_of:
            for key in _BOUNDS.values():
                setattr(schema, key, None)


_BOUNDS = {"ge": "minimum", "gt": "exclusive_minimum", "le": "maximum", "lt": "exclusive_maximum"}


def _forbid_unknown_fields(schemas: dict[str, Schema]) -> None:
    """``additionalProperties: false`` on the bodies that refuse unknown fields, as the
    decoder does (``forbid_unknown_fields``)."""
    for struct in FORBIDDING_STRUCTS:
        schema = schemas.get(struct.__name__)
        if schema is not None:
            schema.additional_properties = False


FORBIDDING_STRUCTS = [
    value
    for value in vars(api_schemas).values()
    if isinstance(value, type)
    and issubclass(value, msgspec.Struct)
    and value.__struct_config__.forbid_unknown_fields
]
"""Every body struct that refuses unknown fields."""


def create_app(runtime: Runtime) -> Litestar:
    settings = runtime.settings
    task_body = settings.max_payload_bytes + BODY_MARGIN
    batch_body = max(BATCH_BODY_MIN, settings.max_payload_bytes * 16)
    limiter = SubmitLimiter(settings.submit_rate, settings.submit_burst)

    def provide_runtime() -> Runtime:
        return runtime

    def provide_limiter() -> SubmitLimiter:
        return limiter

    def provide_caller(request: Request[Any, Any, Any]) -> Principal:
        return auth.principal(request)

    viewer, submitter, admin = Role.VIEWER, Role.SUBMITTER, Role.ADMIN
    tasks, pools, tokens, keys = ["tasks"], ["pools"], ["tokens"], ["api keys"]
    v1 = Router(
        path=API_PREFIX,
        route_handlers=[
            post(
                "/tasks",
                status_code=HTTP_201_CREATED,
                request_max_body_size=task_body,
                tags=tasks,
                responses={
                    HTTP_200_OK: ResponseSpec(
                        TaskView, description="Idempotency key matched", generate_examples=False
                    )
                },
                **_guarded(submitter, 404, 429),
            )(submit_task),
            post(
                "/tasks/batch",
                status_code=HTTP_201_CREATED,
                request_max_body_size=batch_body,
                tags=tasks,
                **_guarded(submitter, 404, 429),
            )(submit_batch),
            post(
                "/tasks/wait",
                status_code=HTTP_200_OK,
                request_max_body_size=WAIT_BODY,
                tags=tasks,
                **_guarded(viewer, 404),
            )(wait_tasks),
            get("/tasks", tags=tasks, **_guarded(viewer, 404))(list_tasks),
            get("/tasks/changes", tags=tasks, **_guarded(viewer, 404))(task_changes),
            get("/tasks/{task_id:str}", tags=tasks, **_guarded(viewer, 404))(get_task),
            post(
                "/tasks/{task_id:str}/cancel",
                status_code=HTTP_200_OK,
                tags=tasks,
                **_guarded(submitter, 404, 409),
            )(cancel_task),
            get("/tasks/{task_id:str}/history", tags=tasks, **_guarded(viewer, 404))(task_history),
            post(
                "/tasks/{task_id:str}/log-grant",
                status_code=HTTP_200_OK,
                tags=tasks,
                **_guarded(submitter, 404),
            )(log_grant),
            post("/pools", status_code=HTTP_201_CREATED, tags=pools, **_guarded(admin, 409))(
                create_pool
            ),
            get("/pools", tags=pools, **_guarded(viewer))(list_pools),
            patch("/pools/{name:str}", status_code=HTTP_200_OK, tags=pools, **_guarded(admin, 404))(
                update_pool
            ),
            post(
                "/pools/{name:str}/drain",
                status_code=HTTP_200_OK,
                tags=pools,
                **_guarded(admin, 404),
            )(drain_pool),
            post(
                "/pools/{name:str}/resume",
                status_code=HTTP_200_OK,
                tags=pools,
                **_guarded(admin, 404),
            )(resume_pool),
            get("/agents", tags=["agents"], **_guarded(viewer))(list_agents),
            post(
                "/agents/register",
                status_code=HTTP_201_CREATED,
                tags=["agents"],
                opt={"agent_auth": True, ERRORS_OPT: (409, 503)},
            )(register_agent),
            post("/tokens", status_code=HTTP_201_CREATED, tags=tokens, **_guarded(admin, 404))(
                create_token
            ),
            get("/tokens", tags=tokens, **_guarded(admin))(list_tokens),
            delete(
                "/tokens/{token_id:str}",
                status_code=HTTP_200_OK,
                tags=tokens,
                **_guarded(admin, 404),
            )(revoke_token),
            post("/apikeys", status_code=HTTP_201_CREATED, tags=keys, **_guarded(admin))(
                create_api_key
            ),
            get("/apikeys", tags=keys, **_guarded(admin))(list_api_keys),
            delete(
                "/apikeys/{key_id:str}", status_code=HTTP_200_OK, tags=keys, **_guarded(admin, 404)
            )(revoke_api_key),
            post("/login", status_code=HTTP_200_OK, tags=keys, **_guarded(viewer))(login),
            get("/audit", tags=["audit"], **_guarded(admin))(list_audit),
        ],
    )
    app = Litestar(
        route_handlers=[
            v1,
            get("/healthz", tags=["health"], **auth.PUBLIC)(healthz),
            get(
                "/readyz",
                tags=["health"],
                responses={
                    HTTP_503_SERVICE_UNAVAILABLE: ResponseSpec(
                        dict[str, str],
                        description="Unready: the reason says which dependency is down",
                        generate_examples=False,
                    )
                },
                **auth.PUBLIC,
            )(readyz),
            get("/metrics", tags=["health"], include_in_schema=False, **auth.requires(viewer))(
                metrics
            ),
        ],
        guards=[auth.guard],
        dependencies={
            "rt": Provide(provide_runtime, sync_to_thread=False),
            "limiter": Provide(provide_limiter, sync_to_thread=False),
            "caller": Provide(provide_caller, sync_to_thread=False),
        },
        exception_handlers={
            service.ServiceError: _on_service_error,
            HTTPException: _on_http_error,
            DBAPIError: _on_database_error,
            SQLAlchemyError: _on_database_outage,
            OSError: _on_database_outage,
            Exception: _on_internal_error,
        },
        request_class=JsonRequest,
        before_request=check_query,
        request_max_body_size=task_body,
        state=State({"authenticator": auth.Authenticator(runtime)}),
        openapi_config=OpenAPIConfig(
            title="rexec Remote Execution API",
            version="1.0.0",
            description="Submit tasks to agent pools, follow them, and manage pools, agents, "
            "agent tokens and operator API keys. Every operation but /healthz, /readyz, this document "
            "and agent registration needs an API key (Authorization: Bearer <key>) with the "
            "role named in its security requirement.",
            components=Components(security_schemes=auth.SECURITY_SCHEMES),
            openapi_router=Router(
                path="/schema", route_handlers=[], include_in_schema=False, **auth.PUBLIC
            ),
        ),
        logging_config=None,
        debug=False,
    )
    auth.check_routes(app)
    describe_errors(app)
    return app
