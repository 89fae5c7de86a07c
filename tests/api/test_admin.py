"""Pools, agent tokens, agent registration and listing, the OpenAPI document, the API key."""

from __future__ import annotations

import dataclasses
import hashlib
import time

import aio_pika
import httpx
import msgspec
import pytest
from sqlalchemy import select, update

from rexec.dispatcher.api import create_app
from rexec.dispatcher.db.models import Token
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages, names

pytestmark = pytest.mark.anyio


async def queue_exists(rt: Runtime, name: str) -> bool:
    channel = await rt.connection.channel()
    try:
        await channel.declare_queue(name, passive=True)
        return True
    except aio_pika.exceptions.ChannelClosed:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()


def register_body(pool: str, **fields: object) -> dict[str, object]:
    body: dict[str, object] = {
        "pool": pool,
        "hostname": "Worker_01.example.COM",
        "pid": 4242,
        "concurrency": 4,
        "version": messages.PROTOCOL_VERSION,
        "protocol_minor": messages.PROTOCOL_MINOR,
    }
    return {**body, **fields}


async def new_token(api: httpx.AsyncClient, pool: str, **fields: object) -> dict[str, object]:
    response = await api.post("/v1/tokens", json={"pool": pool, **fields})
    assert response.status_code == 201, response.text
    created: dict[str, object] = response.json()
    return created


async def register(
    api: httpx.AsyncClient, secret: str | None, pool: str, **fields: object
) -> httpx.Response:
    request = api.build_request("POST", "/v1/agents/register", json=register_body(pool, **fields))
    del request.headers["authorization"]  # the client's operator key is no agent token
    if secret is not None:
        request.headers["authorization"] = f"Bearer {secret}"
    return await api.send(request)


async def test_pools(api: httpx.AsyncClient, runtime: Runtime, pool_name: str) -> None:
    response = await api.post("/v1/pools", json={"name": pool_name, "description": "GPU boxes"})
    assert response.status_code == 201, response.text
    assert response.json()["description"] == "GPU boxes"
    assert response.json()["draining"] is False
    assert await queue_exists(runtime, names.pool_queue(pool_name))
    assert await queue_exists(runtime, names.dead_queue(pool_name))

    duplicate = await api.post("/v1/pools", json={"name": pool_name})
    assert duplicate.status_code == 409
    assert duplicate.json()["error"] == f"pool '{pool_name}' already exists"
    invalid = await api.post("/v1/pools", json={"name": "Bad Name!"})
    assert invalid.status_code == 422 and "invalid pool name" in invalid.json()["error"]

    for _ in range(2):
        await api.post("/v1/tasks", json={"pool": pool_name, "target": "a:b"})
    pools = {p["name"]: p for p in (await api.get("/v1/pools")).json()}
    assert pools[pool_name]["tasks"] == {"queued": 2}

    drained = await api.post(f"/v1/pools/{pool_name}/drain")
    assert drained.status_code == 200 and drained.json()["draining"] is True
    assert drained.json()["tasks"] == {"queued": 2}
    pools = {p["name"]: p for p in (await api.get("/v1/pools")).json()}
    assert pools[pool_name]["draining"] is True
    resumed = await api.post(f"/v1/pools/{pool_name}/resume")
    assert resumed.status_code == 200 and resumed.json()["draining"] is False
    missing = await api.post("/v1/pools/nope/drain")
    assert missing.status_code == 404 and "rexec pool create nope" in missing.json()["error"]


async def test_tokens(api: httpx.AsyncClient, runtime: Runtime, pool: str) -> None:
    created = await new_token(api, pool, name="cluster-a", expires_in=3600)
    secret = str(created["secret"])
    token = created["token"]
    assert isinstance(token, dict)
    assert secret.startswith("rexec_at_") and len(secret) > 40
    assert token["prefix"] == secret[:12]
    assert token["state"] == "active" and token["name"] == "cluster-a"
    assert token["expires_at"] == pytest.approx(token["created_at"] + 3600)
    async with runtime.sessions() as session:
        row = await session.get(Token, token["id"])
        assert row is not None
        assert row.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in (row.secret_hash, row.prefix, row.name)

    listed = (await api.get("/v1/tokens", params={"pool": pool})).json()
    assert [t["id"] for t in listed] == [token["id"]]
    assert "secret" not in listed[0]

    revoked = await api.delete(f"/v1/tokens/{token['id']}")
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    listed = (await api.get("/v1/tokens", params={"pool": pool})).json()
    assert listed[0]["state"] == "revoked"
    assert (await api.delete("/v1/tokens/nope")).status_code == 404
    unknown_pool = await api.post("/v1/tokens", json={"pool": "no-such-pool"})
    assert unknown_pool.status_code == 404
    bad_expiry = await api.post("/v1/tokens", json={"pool": pool, "expires_in": 0})
    assert bad_expiry.status_code == 422
    # A lifetime past any calendar (found by schemathesis) broke every listing that shows it.
    for path, body in (("/v1/tokens", {"pool": pool}), ("/v1/apikeys", {"role": "viewer"})):
        endless = await api.post(path, json={**body, "expires_in": 1e16})
        assert endless.status_code == 422, endless.text
        assert "expires_in must be at most" in endless.json()["error"]


async def test_register_agent(api: httpx.AsyncClient, runtime: Runtime, pool: str) -> None:
    created = await new_token(api, pool)
    secret, token = str(created["secret"]), created["token"]
    assert isinstance(token, dict)
    before = time.time()
    response = await register(api, secret, pool)
    assert response.status_code == 201, response.text
    registered = response.json()
    assert registered["pool"] == pool
    assert registered["heartbeat_ttl"] == runtime.settings.heartbeat_ttl
    assert registered["protocol_version"] == messages.PROTOCOL_VERSION
    agent_id = registered["agent_id"]
    prefix, _, suffix = agent_id.rpartition("-")
    assert prefix == "worker-01-example-com" and len(suffix) == 8
    int(suffix, 16)
    assert await queue_exists(runtime, names.agent_queue(agent_id))
    listed = (await api.get("/v1/tokens", params={"pool": pool})).json()
    assert listed[0]["last_used_at"] >= before

    # A second agent with the same token gets its own id.
    other = (await register(api, secret, pool)).json()
    assert other["agent_id"] != agent_id


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("missing", 401, "missing agent token"),
        ("not-bearer", 401, "must be 'Bearer <token>'"),
        ("forged", 401, "unknown agent token"),
        ("revoked", 401, "is revoked"),
        ("expired", 401, "is expired"),
        (
            "wrong-pool",
            409,
            "this token belongs to pool {other} but the agent asked for pool {pool}",
        ),
        ("new-protocol", 422, "agent speaks protocol 99.0"),
        ("old-protocol", 422, "upgrade the agent"),
    ],
)
async def test_register_refuses(
    api: httpx.AsyncClient,
    runtime: Runtime,
    pool: str,
    pool_name: str,
    case: str,
    status: int,
    message: str,
) -> None:
    other = f"{pool_name}-b"
    assert (await api.post("/v1/pools", json={"name": other})).status_code == 201
    created = await new_token(api, other if case == "wrong-pool" else pool)
    secret, token = str(created["secret"]), created["token"]
    assert isinstance(token, dict)
    headers: dict[str, str] = {"authorization": f"Bearer {secret}"}
    body = register_body(pool)
    if case == "missing":
        headers = {}
    elif case == "not-bearer":
        headers = {"authorization": secret}
    elif case == "forged":
        headers = {"authorization": "Bearer rexec_at_" + "A" * 43}
    elif case == "revoked":
        await api.delete(f"/v1/tokens/{token['id']}")
    elif case == "expired":
        async with runtime.sessions.begin() as session:
            await session.execute(
                update(Token).where(Token.id == token["id"]).values(expires_at=time.time() - 1)
            )
        listed = (await api.get("/v1/tokens", params={"pool": pool})).json()
        assert listed[0]["state"] == "expired"
    elif case == "new-protocol":
        body["version"], body["protocol_minor"] = 99, 0
    elif case == "old-protocol":
        body["version"] = 0
    request = api.build_request("POST", "/v1/agents/register", json=body)
    del request.headers["authorization"]  # the client's operator key is no agent token
    request.headers.update(headers)
    response = await api.send(request)
    assert response.status_code == status, response.text
    assert message.format(other=other, pool=pool) in response.json()["error"]
    assert (await api.get("/v1/agents", params={"pool": pool})).json() == []


async def test_agents_online_and_offline(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    secret = str((await new_token(api, pool))["secret"])
    alive = (await register(api, secret, pool, hostname="alive")).json()["agent_id"]
    dead = (await register(api, secret, pool, hostname="dead")).json()["agent_id"]
    beat = msgspec.json.encode({"at": time.time() - 1.5, "running": 2})
    await runtime.redis.set(runtime.keys.agent(alive), beat, ex=30)

    agents = {a["id"]: a for a in (await api.get("/v1/agents", params={"pool": pool})).json()}
    assert set(agents) == {alive, dead}
    assert agents[alive]["state"] == "online"
    assert agents[alive]["running"] == 2 and agents[alive]["concurrency"] == 4
    assert 1.4 < agents[alive]["heartbeat_age"] < 10
    assert agents[dead]["state"] == "offline" and agents[dead]["heartbeat_age"] is None
    assert agents[dead]["hostname"] == "dead" and agents[dead]["pid"] == 4242

    everyone = (await api.get("/v1/agents")).json()
    assert {alive, dead} <= {a["id"] for a in everyone}


async def test_openapi_lists_every_route(api: httpx.AsyncClient) -> None:
    response = await api.get("/schema/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    expected = {
        "/v1/tasks": {"get", "post"},
        "/v1/tasks/batch": {"post"},
        "/v1/tasks/wait": {"post"},
        "/v1/tasks/changes": {"get"},
        "/v1/tasks/{task_id}": {"get"},
        "/v1/tasks/{task_id}/cancel": {"post"},
        "/v1/tasks/{task_id}/history": {"get"},
        "/v1/tasks/{task_id}/log-grant": {"post"},
        "/v1/pools": {"get", "post"},
        "/v1/pools/{name}": {"patch"},
        "/v1/pools/{name}/drain": {"post"},
        "/v1/pools/{name}/resume": {"post"},
        "/v1/agents": {"get"},
        "/v1/agents/register": {"post"},
        "/v1/tokens": {"get", "post"},
        "/v1/tokens/{token_id}": {"delete"},
        "/v1/apikeys": {"get", "post"},
        "/v1/apikeys/{key_id}": {"delete"},
        "/v1/login": {"post"},
        "/v1/audit": {"get"},
        "/healthz": {"get"},
        "/readyz": {"get"},
    }
    assert {path: set(ops) for path, ops in paths.items()} == expected
    schemas = response.json()["components"]["schemas"]
    assert {"SubmitTask", "TaskView", "ErrorBody", "AgentRegistered"} <= set(schemas)


async def test_healthz_and_unknown_routes(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).json() == {"status": "ok"}
    missing = await api.get("/v1/nothing")
    assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]


async def test_unready_without_the_broker_yet_alive(runtime: Runtime) -> None:
    """Readiness says why the replica cannot serve; liveness does not restart it for that."""
    app = create_app(runtime)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://rexec.test") as api:
        await runtime.connection.close()
        unready = await api.get("/readyz")
        assert unready.status_code == 503
        assert "RabbitMQ" in unready.json()["reason"]
        assert (await api.get("/healthz")).status_code == 200


async def test_api_key_guards_every_route_but_registration(runtime: Runtime, pool: str) -> None:
    settings = msgspec.structs.replace(runtime.settings, api_key="s3cret")
    app = create_app(dataclasses.replace(runtime, settings=settings))
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://rexec.test") as api:
        refused = await api.get("/v1/pools")
        assert refused.status_code == 401 and "REXEC_API_KEY" in refused.json()["error"]
        wrong = await api.get("/v1/pools", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        allowed = await api.get("/v1/pools", headers={"authorization": "Bearer s3cret"})
        assert allowed.status_code == 200
        assert (await api.get("/healthz")).status_code == 200
        agent = await api.post("/v1/agents/register", json=register_body(pool))
        assert agent.status_code == 401 and "missing agent token" in agent.json()["error"]


async def test_token_rows_hold_no_secret(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    secret = str((await new_token(api, pool))["secret"])
    async with runtime.sessions() as session:
        hashes = list(await session.scalars(select(Token.secret_hash).where(Token.pool == pool)))
    assert hashes == [hashlib.sha256(secret.encode()).hexdigest()]


async def test_metrics_describe_tasks_queues_and_agents(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    await api.post("/v1/tasks", json={"pool": pool, "target": "m:f"})
    await runtime.redis.set(
        runtime.keys.agent("m-agent"), b'{"pool": "%s", "at": 1}' % pool.encode(), ex=30
    )
    runtime.metrics.stale_events.labels("stale_attempt").inc()
    text = (await api.get("/metrics")).text
    assert f'rexec_tasks{{pool="{pool}",state="queued"}} 1.0' in text
    assert f'rexec_queue_depth{{pool="{pool}"}}' in text
    assert f'rexec_agents_live{{pool="{pool}"}} 1.0' in text
    assert 'rexec_stale_events_total{reason="stale_attempt"} 1.0' in text
    assert "rexec_submit_to_start_seconds_bucket" in text or "rexec_submit_to_start_seconds" in text


async def test_a_missing_pool_queue_hides_only_that_pools_depth(
    api: httpx.AsyncClient, runtime: Runtime, pool_name: str
) -> None:
    gone, pool = f"a{pool_name}", pool_name  # the missing one first, by name and by age
    for name in (gone, pool):
        assert (await api.post("/v1/pools", json={"name": name})).status_code == 201
    channel = await runtime.connection.channel()
    await channel.queue_delete(names.pool_queue(gone))
    await channel.close()
    text = (await api.get("/metrics")).text
    assert f'rexec_queue_depth{{pool="{pool}"}} 0.0' in text
    assert f'rexec_queue_depth{{pool="{gone}"}}' not in text
