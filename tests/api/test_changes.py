"""The change feed of task states (``GET /v1/tasks/changes``) against the real dispatcher:
order, cursor, pool filter, limit, the long-poll, and the clients' ``changes``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from rexec.client import AsyncRexecClient, RexecClient, TaskChanges
from rexec.dispatcher import service
from rexec.dispatcher.api import create_app
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages
from tests.api.test_tasks import apply_event, finish, submit

pytestmark = pytest.mark.anyio


async def feed(api: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await api.get("/v1/tasks/changes", params=params, timeout=90)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def fail(rt: Runtime, task_id: str) -> None:
    now = time.time()
    await apply_event(rt, messages.Started(task_id=task_id, attempt=1, agent_id="b", at=now))
    await apply_event(
        rt,
        messages.Failed(
            task_id=task_id,
            attempt=1,
            agent_id="b",
            at=now,
            error_type="ValueError",
            message="no",
            retryable=False,
        ),
    )


async def second_pool(api: httpx.AsyncClient, pool: str) -> str:
    other = f"{pool}-b"
    response = await api.post("/v1/pools", json={"name": other})
    assert response.status_code == 201, response.text
    return other


async def test_the_feed_lists_changes_in_order_from_a_cursor(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    start = await feed(api)  # no `after`: the starting point, and no changes
    assert start["changes"] == [] and isinstance(start["cursor"], int) and start["cursor"] >= 0
    other = await second_pool(api, pool)
    first = (await submit(api, pool, idempotency_key="k1")).json()
    second = (await submit(api, other)).json()
    await finish(runtime, first["id"])
    await fail(runtime, second["id"])

    body = await feed(api, after=start["cursor"])
    seen = [(c["task_id"], c["state"], c["attempt"]) for c in body["changes"]]
    assert seen == [
        (first["id"], "running", 1),
        (first["id"], "succeeded", 1),
        (second["id"], "running", 1),
        (second["id"], "failed", 1),
    ]
    seqs = [c["seq"] for c in body["changes"]]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4 and seqs[0] > start["cursor"]
    assert body["cursor"] == seqs[-1]
    assert body["changes"][0]["idempotency_key"] == "k1"
    assert body["changes"][1]["agent_id"] == "a" and body["changes"][3]["agent_id"] == "b"
    assert body["changes"][2]["idempotency_key"] is None
    assert all(isinstance(c["at"], float) and "reason" in c for c in body["changes"])
    # The history holds the same transitions, with the same reasons.
    history = (await api.get(f"/v1/tasks/{second['id']}/history")).json()
    assert [h["reason"] for h in history[1:]] == [c["reason"] for c in body["changes"][2:]]

    # Read on from the cursor: nothing new; a starting point is now the last change.
    assert await feed(api, after=body["cursor"]) == {"cursor": body["cursor"], "changes": []}
    assert (await feed(api))["cursor"] >= body["cursor"]

    # Pools: one, several (the parameter repeats), and an unknown one.
    only = await feed(api, after=start["cursor"], pool=other)
    assert [c["task_id"] for c in only["changes"]] == [second["id"]] * 2
    assert only["cursor"] == seqs[-1]
    both = await api.get(
        "/v1/tasks/changes", params=[("after", start["cursor"]), ("pool", pool), ("pool", other)]
    )
    assert both.status_code == 200, both.text
    assert [c["seq"] for c in both.json()["changes"]] == seqs
    unknown = await api.get("/v1/tasks/changes", params={"after": 0, "pool": f"{pool}-none"})
    assert unknown.status_code == 404 and f"unknown pool '{pool}-none'" in unknown.json()["error"]

    # Limit: the oldest first, and the cursor reads on from the last one returned.
    page = await feed(api, after=start["cursor"], pool=[pool, other], limit=3)
    assert [c["seq"] for c in page["changes"]] == seqs[:3] and page["cursor"] == seqs[2]
    rest = await feed(api, after=page["cursor"], pool=[pool, other], limit=3)
    assert [c["seq"] for c in rest["changes"]] == seqs[3:] and rest["cursor"] == seqs[3]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("wait=61", "wait"),
        ("wait=-1", "wait"),
        ("after=-1", "after"),
        ("after=x", "after"),
        ("after=1&after=2", "query parameter 'after' is given 2 times"),
        ("since=3", "unknown query parameter 'since'"),
    ],
)
async def test_bad_feed_parameters_are_a_clear_400(
    api: httpx.AsyncClient, query: str, message: str
) -> None:
    response = await api.get(f"/v1/tasks/changes?{query}")
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


async def test_the_long_poll_returns_when_a_change_lands(
    api: httpx.AsyncClient, runtime: Runtime, pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait ends on the events consumer's wake-up, well before its periodic recheck."""
    monkeypatch.setattr(service, "WAIT_RECHECK", 30.0)
    task = (await submit(api, pool)).json()
    cursor = (await feed(api))["cursor"]
    answers: list[dict[str, Any]] = []

    async def waiter() -> None:
        answers.append(await feed(api, after=cursor, pool=pool, wait=30))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        started = time.monotonic()
        await finish(runtime, task["id"])
    assert time.monotonic() - started < 5
    [answer] = answers
    assert answer["changes"] and answer["changes"][0]["task_id"] == task["id"]
    assert answer["cursor"] == answer["changes"][-1]["seq"]


async def test_the_long_poll_sees_writers_that_wake_nobody(
    api: httpx.AsyncClient, runtime: Runtime, pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transition written without the wake-up (the watchdog, another replica) is found by
    the periodic recheck."""
    monkeypatch.setattr(service, "WAIT_RECHECK", 0.1)
    monkeypatch.setattr(runtime, "notify_applied", lambda: None)
    task = (await submit(api, pool)).json()
    cursor = (await feed(api))["cursor"]
    answers: list[dict[str, Any]] = []

    async def waiter() -> None:
        answers.append(await feed(api, after=cursor, pool=pool, wait=30))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        started = time.monotonic()
        await finish(runtime, task["id"])
    assert time.monotonic() - started < 10
    assert [c["task_id"] for c in answers[0]["changes"]][:1] == [task["id"]]


async def test_the_wait_runs_out_with_no_change(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    await submit(api, pool)  # a submission is no change
    cursor = (await feed(api))["cursor"]
    started = time.monotonic()
    body = await feed(api, after=cursor, pool=pool, wait=0.3)
    elapsed = time.monotonic() - started
    assert body == {"cursor": cursor, "changes": []}
    assert 0.3 <= elapsed < 10


@pytest.fixture
async def rexec(runtime: Runtime) -> AsyncIterator[AsyncRexecClient]:
    transport = httpx.ASGITransport(app=create_app(runtime))  # type: ignore[arg-type]
    async with AsyncRexecClient("http://rexec.test", transport=transport) as client:
        yield client


async def test_the_clients_read_the_feed(
    rexec: AsyncRexecClient, runtime: Runtime, pool: str
) -> None:
    start = await rexec.changes()
    assert isinstance(start, TaskChanges) and start.changes == []
    task = await rexec.submit(pool, "jobs.math:add", idempotency_key="feed")
    await finish(runtime, task.id)
    read = await rexec.changes(start.cursor, pools=[pool], limit=1)
    assert [(c.task_id, c.state.value) for c in read.changes] == [(task.id, "running")]
    assert read.cursor == read.changes[0].seq
    rest = await rexec.changes(read.cursor, pools=[pool], wait=5)
    assert [c.state.value for c in rest.changes] == ["succeeded"]
    assert rest.changes[0].idempotency_key == "feed"
    assert (await rexec.changes(rest.cursor, wait=0.1)).changes == []


def test_the_client_call_outlasts_the_wait() -> None:
    """The read timeout of a long-poll is longer than the wait it asks for."""
    from rexec.client import _calls

    call = _calls.changes(7, ["a", "b"], 45, 10)
    assert call.timeout is not None and call.timeout > 45
    request = call.request(httpx.Client(base_url="http://rexec.test"))
    assert request.url.params.multi_items() == [
        ("after", "7"),
        ("pool", "a"),
        ("pool", "b"),
        ("wait", "45"),
        ("limit", "10"),
    ]
    assert _calls.changes(None, [], 0, 500).request(httpx.Client()).url.params.get("after") is None
    with RexecClient("http://rexec.test", transport=httpx.MockTransport(_answer)) as client:
        assert client.changes(3, pools=["a"], wait=1).cursor == 3


def _answer(request: httpx.Request) -> httpx.Response:
    assert request.url.path == "/v1/tasks/changes" and request.url.params["after"] == "3"
    return httpx.Response(200, json={"cursor": 3, "changes": []})


async def test_the_document_declares_the_feed(api: httpx.AsyncClient) -> None:
    document = (await api.get("/schema/openapi.json")).json()
    operation = document["paths"]["/v1/tasks/changes"]["get"]
    params = {p["name"]: p["schema"] for p in operation["parameters"]}
    assert params.keys() == {"after", "pool", "wait", "limit"}
    assert {"type": "array", "items": {"type": "string"}} in params["pool"]["oneOf"]
    assert (params["wait"]["minimum"], params["wait"]["maximum"]) == (0, 60)
    assert (params["limit"]["minimum"], params["limit"]["maximum"]) == (1, 1000)
    assert operation["security"] == [{"apiKey": ["viewer"]}]
    schema = document["components"]["schemas"]["TaskChange"]
    assert set(schema["required"]) >= {"seq", "task_id", "attempt", "state", "at"}
