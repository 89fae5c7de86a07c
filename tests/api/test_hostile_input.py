"""Input found by fuzzing the API: every one is refused with a clear 4xx, never a 5xx, and
leaves nothing behind (no task row, no pool row, no broker queue)."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from sqlalchemy import func, select

from rexec.dispatcher import service
from rexec.dispatcher.db.models import Pool, Task
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages, names
from rexec.schemas.api import MAX_NESTING, PoolCreate
from tests.api.test_admin import new_token, queue_exists

pytestmark = pytest.mark.anyio

TOO_BIG = 2**63
"""One more than SQLite's (and PostgreSQL's bigint) largest integer."""


def nested(depth: int) -> object:
    """A value ``depth`` levels of lists deep: ``[[...[1]...]]``."""
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


async def count_tasks(rt: Runtime, pool: str) -> int:
    async with rt.sessions() as session:
        return int(await session.scalar(select(func.count()).where(Task.pool == pool)) or 0)


# --- 1. bounds of a submission ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_attempts": 1100}, "max_attempts must be at most 100"),
        ({"max_attempts": TOO_BIG}, "max_attempts must be at most 100"),
        ({"max_attempts": 0}, "max_attempts must be at least 1"),
        ({"retry_backoff": 5e-324}, "retry_backoff must be 0 (retry at once) or at least 0.001"),
        ({"retry_backoff": 1e300}, "retry_backoff must be at most 86400"),
        ({"retry_backoff": -1}, "retry_backoff must be at least 0"),
        ({"timeout": 1e-9}, "timeout must be at least 0.001"),
        ({"timeout": 1e300}, "timeout must be at most 604800"),
        ({"expires_in": 1e300}, "expires_in must be at most 2592000"),
        ({"expires_in": 0}, "expires_in must be at least 0.001"),
    ],
)
async def test_out_of_range_submissions_are_a_clear_422(
    api: httpx.AsyncClient, runtime: Runtime, pool: str, fields: dict[str, object], message: str
) -> None:
    body = {"pool": pool, "command": ["false"], **fields}
    response = await api.post("/v1/tasks", json=body)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]
    batch = await api.post(
        "/v1/tasks/batch", json={"tasks": [{"pool": pool, "target": "a:b"}, body]}
    )
    assert batch.status_code == 422, batch.text
    assert "tasks[1]." + message in batch.json()["error"] or (
        "task 1: " + message in batch.json()["error"]
    )
    assert await count_tasks(runtime, pool) == 0


async def test_the_bounds_are_in_the_openapi_document(api: httpx.AsyncClient) -> None:
    document = (await api.get("/schema/openapi.json")).json()
    schemas = document["components"]["schemas"]

    def bounds(schema: str, name: str) -> dict[str, object]:
        field = schemas[schema]["properties"][name]
        return {k: v for k, v in field.items() if k in ("minimum", "maximum")}

    # Litestar leaves out a bound of 0 (retry_backoff's minimum): the description says it.
    assert {
        name: bounds("SubmitTask", name)
        for name in ("max_attempts", "retry_backoff", "timeout", "expires_in")
    } == {
        "max_attempts": {"minimum": 1, "maximum": 100},
        "retry_backoff": {"maximum": 86400},
        "timeout": {"minimum": 0.001, "maximum": 604800},
        "expires_in": {"minimum": 0.001, "maximum": 2592000},
    }
    assert bounds("PoolCreate", "max_running") == {"minimum": 1, "maximum": 1_000_000}
    assert bounds("PoolUpdate", "max_running") == {"minimum": 1, "maximum": 1_000_000}


async def test_the_most_a_submission_may_ask_is_accepted(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    body = {
        "pool": pool,
        "target": "a:b",
        "max_attempts": 100,
        "retry_backoff": 86400,
        "timeout": 604800,
        "expires_in": 2592000,
    }
    assert (await api.post("/v1/tasks", json=body)).status_code == 201
    zero = {"pool": pool, "target": "a:b", "retry_backoff": 0, "timeout": 0.001}
    assert (await api.post("/v1/tasks", json=zero)).status_code == 201
    assert await count_tasks(runtime, pool) == 2


# --- 2. deeply nested bodies --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/tasks"),
        ("POST", "/v1/tasks/batch"),
        ("POST", "/v1/tasks/wait"),
        ("POST", "/v1/pools"),
        ("PATCH", "/v1/pools/{pool}"),
        ("POST", "/v1/tokens"),
        ("POST", "/v1/apikeys"),
        ("POST", "/v1/agents/register"),
    ],
)
async def test_a_deeply_nested_body_is_a_400_on_every_route(
    api: httpx.AsyncClient, pool: str, method: str, path: str
) -> None:
    body = b"[" * 973 + b"]" * 973  # 1946 bytes
    headers = {"content-type": "application/json"}
    if path == "/v1/agents/register":
        headers["authorization"] = ""  # unauthenticated: refused before any token is looked at
    response = await api.request(method, path.format(pool=pool), content=body, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()
    assert set(error) == {"error", "detail"}
    assert "nested more than 64 levels deep" in error["error"]


async def test_nesting_is_counted_outside_strings_only(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    brackets = "[" * 5000 + "{" * 5000
    response = await api.post("/v1/tasks", json={"pool": pool, "target": "a:b", "args": [brackets]})
    assert response.status_code == 201, response.text
    assert response.json()["args"] == [brackets]
    # 64 levels in all is fine: the body object, "args" and 62 more.
    deepest = {"pool": pool, "target": "a:b", "kwargs": {"x": nested(MAX_NESTING - 1)}}
    assert (await api.post("/v1/tasks", json=deepest)).status_code == 201


# --- 3. nesting of arguments and results --------------------------------------------------------


@pytest.mark.parametrize("field", ["args", "kwargs"])
async def test_arguments_nested_too_deeply_are_a_clear_422(
    api: httpx.AsyncClient, runtime: Runtime, pool: str, field: str
) -> None:
    value = [nested(MAX_NESTING)] if field == "args" else {"x": nested(MAX_NESTING)}
    response = await api.post("/v1/tasks", json={"pool": pool, "target": "a:b", field: value})
    assert response.status_code == 422, response.text
    assert f"{field} are nested more than {MAX_NESTING} levels deep" in response.json()["error"]
    batch = [{"pool": pool, "target": "a:b"}, {"pool": pool, "target": "a:b", field: value}]
    response = await api.post("/v1/tasks/batch", json={"tasks": batch})
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("task 1: ")
    assert await count_tasks(runtime, pool) == 0
    fits = [nested(MAX_NESTING - 1)] if field == "args" else {"x": nested(MAX_NESTING - 1)}
    ok = await api.post("/v1/tasks", json={"pool": pool, "target": "a:b", field: fits})
    assert ok.status_code == 201, ok.text


async def test_a_stored_task_nested_too_deeply_does_not_break_reads_or_waits(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    """A row written before submissions were bounded: every read that includes it answers."""
    good = (await api.post("/v1/tasks", json={"pool": pool, "target": "a:b"})).json()["id"]
    deep = uuid.uuid4().hex
    text = "[" * 980 + "]" * 980  # json.dumps itself cannot write it
    async with runtime.sessions.begin() as session:
        session.add(
            Task(
                id=deep,
                pool=pool,
                kind="function",
                target="a:b",
                args_json=text,
                kwargs_json="{}",
                argv_json="[]",
                result_json=text,
                state="succeeded",
                attempt=1,
                max_attempts=1,
                retry_backoff=0.0,
                created_at=time.time(),
                cancel_requested=False,
            )
        )
    waited = await api.post("/v1/tasks/wait", json={"ids": [good, deep], "wait": 0})
    assert waited.status_code == 200, waited.text
    view = waited.json()["tasks"][1]
    assert view["id"] == deep and view["state"] == "succeeded"
    assert view["args"] == [service.UNSHOWN] and view["result"] == service.UNSHOWN
    assert "not shown: nested more than 64 levels deep" in service.UNSHOWN
    assert (await api.get(f"/v1/tasks/{deep}")).status_code == 200
    assert (await api.get("/v1/tasks", params={"pool": pool})).status_code == 200


# --- 4. integers too big for the database -------------------------------------------------------


async def test_integers_too_big_for_the_database_are_a_clear_422(
    api: httpx.AsyncClient, runtime: Runtime, pool: str, pool_name: str
) -> None:
    other = f"{pool_name}-big"
    created = await api.post("/v1/pools", json={"name": other, "max_running": TOO_BIG})
    assert created.status_code == 422, created.text
    assert "max_running must be at most" in created.json()["error"]
    assert not await queue_exists(runtime, names.pool_queue(other))
    updated = await api.patch(f"/v1/pools/{pool}", json={"max_running": TOO_BIG})
    assert updated.status_code == 422, updated.text
    assert "max_running must be at most" in updated.json()["error"]
    task = await api.post(
        "/v1/tasks", json={"pool": pool, "target": "a:b", "max_attempts": TOO_BIG}
    )
    assert task.status_code == 422, task.text


async def test_a_pool_whose_row_cannot_be_written_leaves_no_queues_behind(
    runtime: Runtime, pool_name: str
) -> None:
    """The service itself (no schema in front): the insert fails, and the create with it."""
    with pytest.raises(Exception):  # noqa: B017  (OverflowError on SQLite, DBAPIError on PostgreSQL)
        await service.create_pool(runtime, PoolCreate(name=pool_name, max_running=TOO_BIG))
    async with runtime.sessions() as session:
        assert await session.get(Pool, pool_name) is None
    assert not await queue_exists(runtime, names.pool_queue(pool_name))
    assert not await queue_exists(runtime, names.dead_queue(pool_name))
    # And the name is free to use.
    view = await service.create_pool(runtime, PoolCreate(name=pool_name, max_running=2))
    assert view.max_running == 2
    assert await queue_exists(runtime, names.pool_queue(pool_name))


async def test_a_pool_create_that_conflicts_keeps_the_existing_pools_queues(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    again = await api.post("/v1/pools", json={"name": pool})
    assert again.status_code == 409
    assert await queue_exists(runtime, names.pool_queue(pool))
    assert await queue_exists(runtime, names.dead_queue(pool))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pid": TOO_BIG}, "pid must be at most"),
        ({"concurrency": TOO_BIG}, "concurrency must be at most"),
        ({"concurrency": 0}, "concurrency must be at least 1"),
        ({"protocol_minor": TOO_BIG}, "protocol_minor must be at most"),
    ],
)
async def test_agent_registration_bounds_its_integers(
    api: httpx.AsyncClient, pool: str, fields: dict[str, object], message: str
) -> None:
    """With a valid token, so that the value reaches the database unless refused before."""
    secret = (await new_token(api, pool))["secret"]
    body: dict[str, object] = {
        "pool": pool,
        "hostname": "h",
        "pid": 1,
        "concurrency": 1,
        "version": messages.PROTOCOL_VERSION,
        "protocol_minor": messages.PROTOCOL_MINOR,
        **fields,
    }
    request = api.build_request("POST", "/v1/agents/register", json=body)
    request.headers["authorization"] = f"Bearer {secret}"
    response = await api.send(request)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]


# --- 5. NUL bytes --------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["echo\x00"], ["echo", "a\x00b"]])
async def test_a_nul_byte_in_a_command_is_a_clear_422(
    api: httpx.AsyncClient, runtime: Runtime, pool: str, argv: list[str]
) -> None:
    response = await api.post("/v1/tasks", json={"pool": pool, "command": argv})
    assert response.status_code == 422, response.text
    index = next(i for i, arg in enumerate(argv) if "\x00" in arg)
    assert f"command[{index}] contains a NUL byte" in response.json()["error"]
    assert await count_tasks(runtime, pool) == 0


@pytest.mark.parametrize("field", ["pool", "idempotency_key"])
async def test_a_nul_byte_in_a_submitted_name_is_a_clear_422(
    api: httpx.AsyncClient, runtime: Runtime, pool: str, field: str
) -> None:
    """Refused before the database: concurrent submits share a transaction, and PostgreSQL's
    refusal of a NUL would fail them all."""
    body = {"pool": pool, "target": "a:b", field: (pool if field == "pool" else "k") + "\x00"}
    response = await api.post("/v1/tasks", json=body)
    assert response.status_code == 422, response.text
    assert f"{field} contains a NUL byte" in response.json()["error"]
    assert await count_tasks(runtime, pool) == 0


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/pools", {"name": "{pool}-nul", "description": "a\x00"}),
        ("POST", "/v1/tokens", {"pool": "{pool}", "name": "a\x00"}),
        ("POST", "/v1/tokens", {"pool": "{pool}", "name": "a" * 201}),
        ("POST", "/v1/apikeys", {"role": "viewer", "name": "a\x00"}),
        ("POST", "/v1/tasks/wait", {"ids": ["a\x00"], "wait": 0}),
        ("GET", "/v1/tasks/a%00b", None),
        ("GET", "/v1/tasks?pool=a%00b", None),
    ],
)
async def test_text_the_database_cannot_store_is_never_a_500(
    api: httpx.AsyncClient,
    runtime: Runtime,
    pool: str,
    method: str,
    path: str,
    body: dict[str, object] | None,
) -> None:
    """PostgreSQL refuses a NUL in any text, even in a lookup, and a text longer than its
    column; SQLite takes both (and a missing task or pool is a 404)."""
    content = json.dumps(body).replace("{pool}", pool) if body is not None else None
    headers = {"content-type": "application/json"}
    response = await api.request(method, path, content=content, headers=headers)
    assert response.status_code < 500, response.text
    if "a" * 201 in (content or ""):
        assert response.status_code == 422
        assert "name must be at most 200 characters long" in response.json()["error"]
    elif runtime.engine.dialect.name == "postgresql":
        assert response.status_code == 422, response.text
        assert set(response.json()) == {"error", "detail"}
        assert "text may not contain NUL" in response.json()["error"]
        if path == "/v1/pools":  # the failed create left no queue behind
            assert not await queue_exists(runtime, names.pool_queue(f"{pool}-nul"))


# --- 7. headers and content types ----------------------------------------------------------------


async def test_a_405_keeps_its_allow_header(api: httpx.AsyncClient) -> None:
    response = await api.put("/v1/tasks")
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert set(response.json()) == {"error", "detail"}


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
async def test_a_body_that_is_not_declared_json_is_a_415(
    api: httpx.AsyncClient, runtime: Runtime, pool: str, content_type: str
) -> None:
    body = json.dumps({"pool": pool, "target": "a:b"}).encode()
    response = await api.post("/v1/tasks", content=body, headers={"content-type": content_type})
    assert response.status_code == 415, response.text
    assert "application/json" in response.json()["error"]
    assert await count_tasks(runtime, pool) == 0


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "application/x+json"]
)
async def test_json_content_types_are_accepted(
    api: httpx.AsyncClient, pool: str, content_type: str
) -> None:
    body = json.dumps({"pool": pool, "target": "a:b"}).encode()
    response = await api.post("/v1/tasks", content=body, headers={"content-type": content_type})
    assert response.status_code == 201, response.text
