"""Operator API keys and roles against the real runtime: every route of the OpenAPI document is
refused without a key and with a key of a lower role; keys are stored hashed, revocable,
expiring; the audit log says who did what."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar, get
from sqlalchemy import select, update

from rexec.dispatcher import auth, statemachine, transitions
from rexec.dispatcher.api import create_app
from rexec.dispatcher.db.models import ApiKey, Task
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages
from rexec.schemas.api import Role
from tests.conftest import BOOTSTRAP_KEY

pytestmark = pytest.mark.anyio

EXCEPTIONS = {
    ("get", "/healthz"): "liveness probes carry no key; it answers only {'status': 'ok'}",
    ("get", "/readyz"): "readiness probes carry no key; it says only whether a dependency is away",
    ("post", "/v1/agents/register"): "authenticated by the agent's token (tested in test_admin)",
}
"""Operations of the OpenAPI document that need no API key (the document itself is not in
the document: /schema is public, it describes only what the open-source code already shows)."""
LOWER = {Role.ADMIN: Role.SUBMITTER, Role.SUBMITTER: Role.VIEWER}
"""The role just below each role: the 'wrong role' a route must refuse."""


async def create_key(api: httpx.AsyncClient, role: Role, **fields: Any) -> dict[str, Any]:
    response = await api.post("/v1/apikeys", json={"role": role.value, **fields})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def call(
    api: httpx.AsyncClient, method: str, path: str, headers: dict[str, str] | None
) -> httpx.Response:
    """One request with exactly these credentials (none of the client's defaults)."""
    body = b"{}" if method in ("post", "patch", "put") else None
    request = api.build_request(method.upper(), path, content=body)
    del request.headers["authorization"]
    if body is not None:
        request.headers["content-type"] = "application/json"
    request.headers.update(headers or {})
    return await api.send(request)


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


def concrete(path: str) -> str:
    """The path with each ``{parameter}`` filled in."""
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        path = path[:start] + "nothing-here" + path[end + 1 :]
    return path


async def test_every_operation_refuses_no_key_and_a_lower_role(api: httpx.AsyncClient) -> None:
    document = (await call(api, "get", "/schema/openapi.json", None)).json()
    keys = {role: (await create_key(api, role, name=f"walk-{role}"))["secret"] for role in Role}
    revoked = await create_key(api, Role.ADMIN, name="walk-revoked")
    assert (await api.delete(f"/v1/apikeys/{revoked['key']['id']}")).status_code == 200
    seen_exceptions = set()
    checked = 0
    for method, path, operation in operations(document):
        url = concrete(path)
        if (method, path) in EXCEPTIONS:
            assert not operation.get("security"), f"{method} {path} is an exception"
            seen_exceptions.add((method, path))
            continue
        # Every other operation declares the role it needs, as its security requirement.
        [requirement] = operation.get("security") or [{}]
        assert list(requirement) == [auth.SCHEME], f"{method} {path} declares no role"
        role = Role(requirement[auth.SCHEME][0])

        for headers in (None, bearer("rexec_ak_forged"), bearer(revoked["secret"])):
            response = await call(api, method, url, headers)
            assert response.status_code == 401, (method, path, response.text)
            assert f"{role.value} role" in response.json()["error"], response.text
            assert response.headers["www-authenticate"].startswith("Bearer")
        if role in LOWER:
            response = await call(api, method, url, bearer(keys[LOWER[role]]))
            assert response.status_code == 403, (method, path, response.text)
            assert f"needs the {role.value} role" in response.json()["error"]
        # The right role gets past the guard: whatever the handler answers, never a 5xx.
        response = await call(api, method, url, bearer(keys[role]))
        assert response.status_code not in (401, 403) and response.status_code < 500, (
            method,
            path,
            response.text,
        )
        checked += 1
    assert seen_exceptions == set(EXCEPTIONS)
    assert checked >= 20


async def test_metrics_need_a_viewer_key_and_the_schema_is_public(api: httpx.AsyncClient) -> None:
    assert (await call(api, "get", "/metrics", None)).status_code == 401
    viewer = (await create_key(api, Role.VIEWER))["secret"]
    metrics = await call(api, "get", "/metrics", bearer(viewer))
    assert metrics.status_code == 200 and "rexec_tasks" in metrics.text
    for path in ("/schema/openapi.json", "/schema/openapi.yaml"):
        assert (await call(api, "get", path, None)).status_code == 200
    assert (await call(api, "get", "/healthz", None)).status_code == 200


def test_an_app_with_a_route_that_declares_no_role_is_refused() -> None:
    @get("/open", sync_to_thread=False)
    def open_route() -> str:
        return "data"

    with pytest.raises(RuntimeError, match=r"routes without a role.*/open"):
        auth.check_routes(Litestar([open_route]))


async def test_roles(api: httpx.AsyncClient, pool: str) -> None:
    viewer = bearer((await create_key(api, Role.VIEWER, name="eyes"))["secret"])
    submitter = bearer((await create_key(api, Role.SUBMITTER, name="ci"))["secret"])
    task = {"pool": pool, "target": "m:f"}

    assert (await call(api, "get", "/v1/tasks", viewer)).status_code == 200
    refused = await api.post("/v1/tasks", json=task, headers=viewer)
    assert refused.status_code == 403
    assert refused.json()["error"].startswith(
        "this needs the submitter role (or above); the API key eyes"
    )
    assert "has the viewer role" in refused.json()["error"]

    submitted = await api.post("/v1/tasks", json=task, headers=submitter)
    assert submitted.status_code == 201
    task_id = submitted.json()["id"]
    assert (await api.post(f"/v1/tasks/{task_id}/cancel", headers=submitter)).status_code == 200
    pool_refused = await api.post("/v1/pools", json={"name": f"{pool}-x"}, headers=submitter)
    assert (
        pool_refused.status_code == 403 and "needs the admin role;" in pool_refused.json()["error"]
    )
    for path in ("/v1/tokens", "/v1/apikeys", "/v1/audit"):
        assert (await call(api, "get", path, submitter)).status_code == 403, path

    # The cancel shows who asked for it in the task's history.
    history = (await api.get(f"/v1/tasks/{task_id}/history")).json()
    assert history[-1]["to_state"] == "cancelled"
    assert history[-1]["by"].startswith("apikey ") and history[-1]["by"].endswith("(ci)")


async def test_api_keys_are_stored_hashed_and_can_be_revoked_or_expire(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    created = await create_key(api, Role.VIEWER, name="grafana", expires_in=3600)
    secret, key = created["secret"], created["key"]
    assert secret.startswith("rexec_ak_") and len(secret) >= 50
    assert key["prefix"] == secret[:13] and key["state"] == "active"
    assert key["expires_at"] == pytest.approx(time.time() + 3600, abs=30)
    async with runtime.sessions() as session:
        stored = await session.get(ApiKey, key["id"])
        assert stored is not None
        assert stored.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
        values = [str(getattr(stored, column.key)) for column in ApiKey.__table__.columns]
        columns = msgspec.json.encode(values)
        assert secret.encode() not in columns

    assert (await call(api, "get", "/v1/pools", bearer(secret))).status_code == 200
    listed = {k["id"]: k for k in (await api.get("/v1/apikeys")).json()}
    assert listed[key["id"]]["last_used_at"] is not None
    assert "secret" not in listed[key["id"]]

    # Expired: refused with the reason.
    async with runtime.sessions.begin() as session:
        await session.execute(
            update(ApiKey).where(ApiKey.id == key["id"]).values(expires_at=time.time() - 1)
        )
    expired = await call(api, "get", "/v1/pools", bearer(secret))
    assert expired.status_code == 401 and f"(id {key['id']}) is expired" in expired.json()["error"]

    other = await create_key(api, Role.SUBMITTER)
    assert (await api.delete(f"/v1/apikeys/{other['key']['id']}")).json()["state"] == "revoked"
    revoked = await call(api, "get", "/v1/tasks", bearer(other["secret"]))
    assert revoked.status_code == 401 and "is revoked" in revoked.json()["error"]
    missing = await api.delete("/v1/apikeys/nope")
    assert missing.status_code == 404 and "rexec apikey list" in missing.json()["error"]
    bad = await api.post("/v1/apikeys", json={"role": "root"})
    assert bad.status_code == 400 or bad.status_code == 422
    assert "role" in bad.json()["error"]


async def test_login_answers_who_the_key_belongs_to(api: httpx.AsyncClient) -> None:
    created = await create_key(api, Role.SUBMITTER, name="laptop")
    who = (await call(api, "post", "/v1/login", bearer(created["secret"]))).json()
    assert who == {
        "kind": "apikey",
        "id": created["key"]["id"],
        "name": "laptop",
        "role": "submitter",
    }
    boot = (await call(api, "post", "/v1/login", bearer(BOOTSTRAP_KEY))).json()
    assert boot == {"kind": "bootstrap", "id": "bootstrap", "name": "bootstrap", "role": "admin"}


async def test_the_audit_log_records_who_did_what(
    api: httpx.AsyncClient, runtime: Runtime, pool_name: str
) -> None:
    admin = await create_key(api, Role.ADMIN, name="ops")
    as_admin = bearer(admin["secret"])
    admin_id = admin["key"]["id"]
    assert (
        await api.post("/v1/pools", json={"name": pool_name}, headers=as_admin)
    ).status_code == 201
    assert (
        await api.patch(f"/v1/pools/{pool_name}", json={"max_running": 3}, headers=as_admin)
    ).json()["max_running"] == 3
    await api.post(f"/v1/pools/{pool_name}/drain", headers=as_admin)
    await api.post(f"/v1/pools/{pool_name}/resume", headers=as_admin)
    token = (await api.post("/v1/tokens", json={"pool": pool_name}, headers=as_admin)).json()
    request = api.build_request(
        "POST",
        "/v1/agents/register",
        json={
            "pool": pool_name,
            "hostname": "h",
            "pid": 1,
            "concurrency": 1,
            "version": 1,
            "protocol_minor": messages.PROTOCOL_MINOR,
        },
    )
    request.headers["authorization"] = f"Bearer {token['secret']}"
    agent = (await api.send(request)).json()
    await api.delete(f"/v1/tokens/{token['token']['id']}", headers=as_admin)
    await api.post("/v1/login", headers=as_admin)

    entries = (await api.get("/v1/audit", params={"limit": 50})).json()
    mine = [
        (e["actor_kind"], e["actor_id"], e["action"], e["target"])
        for e in entries
        if e["target"] in (pool_name, token["token"]["id"], agent["agent_id"], admin_id)
    ]
    assert list(reversed(mine)) == [
        ("bootstrap", "bootstrap", "apikey.create", admin_id),
        ("apikey", admin_id, "pool.create", pool_name),
        ("apikey", admin_id, "pool.update", pool_name),
        ("apikey", admin_id, "pool.drain", pool_name),
        ("apikey", admin_id, "pool.resume", pool_name),
        ("apikey", admin_id, "token.create", token["token"]["id"]),
        ("token", token["token"]["id"], "agent.register", agent["agent_id"]),
        ("apikey", admin_id, "token.revoke", token["token"]["id"]),
        ("apikey", admin_id, "login", admin_id),
    ]
    named = next(e for e in entries if e["action"] == "pool.create" and e["target"] == pool_name)
    assert named["actor_name"] == "ops" and named["at"] == pytest.approx(time.time(), abs=60)


async def test_pool_limits_are_validated(api: httpx.AsyncClient, pool: str) -> None:
    zero = await api.patch(f"/v1/pools/{pool}", json={"max_running": 0})
    assert zero.status_code == 422 and "max_running must be at least 1" in zero.json()["error"]
    assert (await api.patch(f"/v1/pools/{pool}", json={"max_running": None})).json()[
        "max_running"
    ] is None
    missing = await api.patch("/v1/pools/nope", json={"max_running": 2})
    assert missing.status_code == 404


async def test_submissions_are_rate_limited_per_key(runtime: Runtime, pool: str) -> None:
    settings = msgspec.structs.replace(runtime.settings, submit_rate=0.5, submit_burst=2)
    app = create_app(dataclasses.replace(runtime, settings=settings))
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(
        transport=transport, base_url="http://rexec.test", headers=bearer(BOOTSTRAP_KEY)
    ) as api:
        task = {"pool": pool, "target": "m:f"}
        for _ in range(2):
            assert (await api.post("/v1/tasks", json=task)).status_code == 201
        limited = await api.post("/v1/tasks", json=task)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert "may submit 0.5 tasks per second" in limited.json()["error"]
        # Another key has its own bucket.
        other = await create_key(api, Role.SUBMITTER)
        assert (
            await api.post("/v1/tasks", json=task, headers=bearer(other["secret"]))
        ).status_code == 201
        batch = await api.post(
            "/v1/tasks/batch", json={"tasks": [task] * 3}, headers=bearer(other["secret"])
        )
        assert batch.status_code == 429
        assert (
            "a batch of 3 tasks is more than one API key may submit at once (2"
            in batch.json()["error"]
        )
        async with runtime.sessions() as session:
            assert await session.scalar(select(ApiKey.id).where(ApiKey.id == other["key"]["id"]))


async def test_a_running_task_s_cancel_request_shows_who_in_its_history(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    submitter = await create_key(api, Role.SUBMITTER, name="oncall")
    task_id = (await api.post("/v1/tasks", json={"pool": pool, "target": "m:f"})).json()["id"]
    started = messages.Started(task_id=task_id, attempt=1, agent_id="agent-x", at=time.time())
    async with runtime.sessions.begin() as session:
        task = await session.get(Task, task_id)
        assert task is not None
        decision = statemachine.on_event(transitions.snapshot(task), started)
        assert isinstance(decision, statemachine.Transition)
        transitions.apply(session, task, decision, time.time())

    cancelled = await api.post(f"/v1/tasks/{task_id}/cancel", headers=bearer(submitter["secret"]))
    assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"] is True
    history = (await api.get(f"/v1/tasks/{task_id}/history")).json()
    assert [(h["to_state"], h["reason"]) for h in history] == [
        ("queued", "submitted"),
        ("running", started_reason(history)),
        ("running", "cancel requested"),
    ]
    request = history[-1]
    assert request["by"] == f"apikey {submitter['key']['id']} (oncall)"
    assert request["agent_id"] == "agent-x" and request["attempt"] == 1


def started_reason(history: list[dict[str, Any]]) -> str:
    return str(history[1]["reason"])
