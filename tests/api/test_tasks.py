"""Tasks through the API: submit, validation, idempotency, batches, cancel, history, long-poll."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest
from sqlalchemy import func, select

from rexec.dispatcher import statemachine, transitions
from rexec.dispatcher.db.models import Outbox, Task
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages, names
from rexec.schemas.api import TaskState, TaskView

pytestmark = pytest.mark.anyio


async def outbox_rows(rt: Runtime, task_id: str) -> list[tuple[int, float]]:
    async with rt.sessions() as session:
        rows = await session.execute(
            select(Outbox.attempt, Outbox.available_at).where(Outbox.task_id == task_id)
        )
        return [(attempt, at) for attempt, at in rows]


async def count_tasks(rt: Runtime, pool: str) -> int:
    async with rt.sessions() as session:
        return int(await session.scalar(select(func.count()).where(Task.pool == pool)) or 0)


async def apply_event(rt: Runtime, event: messages.TaskEvent) -> None:
    """Change a task the way the events consumer does: through the state machine."""
    async with rt.sessions.begin() as session:
        task = await session.get(Task, event.task_id)
        assert task is not None
        decision = statemachine.on_event(transitions.snapshot(task), event)
        assert isinstance(decision, statemachine.Transition), decision
        result_json = '{"ok": true}' if isinstance(event, messages.Succeeded) else None
        transitions.apply(session, task, decision, time.time(), result_json=result_json)
    rt.notify_applied()


async def finish(rt: Runtime, task_id: str, agent_id: str = "a") -> None:
    now = time.time()
    await apply_event(rt, messages.Started(task_id=task_id, attempt=1, agent_id=agent_id, at=now))
    await apply_event(rt, messages.Succeeded(task_id=task_id, attempt=1, agent_id=agent_id, at=now))


async def submit(api: httpx.AsyncClient, pool: str, **fields: object) -> httpx.Response:
    return await api.post("/v1/tasks", json={"pool": pool, "target": "jobs.demo:add", **fields})


async def test_submit_get_list(api: httpx.AsyncClient, runtime: Runtime, pool: str) -> None:
    before = time.time()
    response = await submit(api, pool, args=[1, 2], kwargs={"x": "y"}, timeout=5, expires_in=60)
    assert response.status_code == 201, response.text
    task = response.json()
    assert task["state"] == "queued"
    assert task["attempt"] == 1
    assert task["kind"] == "function"
    assert task["args"] == [1, 2] and task["kwargs"] == {"x": "y"}
    assert task["max_attempts"] == runtime.settings.default_max_attempts
    assert task["timeout"] == 5
    [(attempt, available_at)] = await outbox_rows(runtime, task["id"])
    assert attempt == 1 and before <= available_at <= time.time()
    async with runtime.sessions() as session:
        row = await session.get(Task, task["id"])
        assert row is not None and row.expires_at is not None
        assert row.expires_at == pytest.approx(row.created_at + 60)
        assert row.retry_backoff == runtime.settings.default_retry_backoff

    got = await api.get(f"/v1/tasks/{task['id']}")
    assert got.status_code == 200 and got.json() == task

    second = (await submit(api, pool, max_attempts=1, retry_backoff=0)).json()
    listed = (await api.get("/v1/tasks", params={"pool": pool})).json()
    assert [t["id"] for t in listed] == [second["id"], task["id"]]  # newest first
    limited = (await api.get("/v1/tasks", params={"pool": pool, "limit": 1})).json()
    assert [t["id"] for t in limited] == [second["id"]]
    queued = (await api.get("/v1/tasks", params={"pool": pool, "state": "queued"})).json()
    assert len(queued) == 2
    running = (await api.get("/v1/tasks", params={"pool": pool, "state": "running"})).json()
    assert running == []

    bad_state = await api.get("/v1/tasks", params={"state": "sleeping"})
    assert bad_state.status_code == 422
    assert "unknown task state 'sleeping'" in bad_state.json()["error"]
    bad_limit = await api.get("/v1/tasks", params={"limit": 0})
    assert bad_limit.status_code == 400
    missing = await api.get("/v1/tasks/nope")
    assert missing.status_code == 404 and "unknown task 'nope'" in missing.json()["error"]


async def test_submit_command(api: httpx.AsyncClient, pool: str) -> None:
    response = await api.post("/v1/tasks", json={"pool": pool, "command": ["echo", "hi there"]})
    assert response.status_code == 201, response.text
    task = response.json()
    assert task["kind"] == "command"
    assert task["target"] == "echo" and task["argv"] == ["echo", "hi there"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"target": "a.b:c"}, 404, "create it with `rexec pool create"),
        ({"target": "not a target"}, 422, "invalid target 'not a target'"),
        ({"target": "module_only"}, 422, "use 'module:function'"),
        ({"target": "a:b", "command": ["ls"]}, 422, "exactly one of 'target'"),
        ({}, 422, "exactly one of 'target'"),
        ({"command": []}, 422, "non-empty list"),
        ({"command": ["ls"], "args": [1]}, 422, "function targets only"),
        ({"command": ["ls", 3]}, 400, "Expected `str`"),
        ({"target": "a:b", "args": {"x": 1}}, 400, "Expected `array`, got `object`"),
        ({"target": "a:b", "kwargs": [1]}, 400, "at field 'kwargs'"),
        ({"target": "a:b", "max_attempts": 0}, 422, "max_attempts must be at least 1"),
        ({"target": "a:b", "timeout": 0}, 422, "timeout must be at least 0.001"),
        ({"target": "a:b", "expires_in": -1}, 422, "expires_in must be at least 0.001"),
        ({"target": "a:b", "retry_backoff": -1}, 422, "retry_backoff"),
        ({"target": "a:b", "colour": "red"}, 400, "unknown field `colour`"),
        ({"target": "a:b", "final_exit_codes": [3]}, 422, "applies to command tasks only"),
        ({"command": ["ls"], "final_exit_codes": [0]}, 422, "final_exit_codes"),
        ({"command": ["ls"], "final_exit_codes": [256]}, 422, "final_exit_codes"),
    ],
)
async def test_submit_refuses_bad_input(
    api: httpx.AsyncClient,
    runtime: Runtime,
    pool: str,
    body: dict[str, object],
    status: int,
    message: str,
) -> None:
    target_pool = "no-such-pool" if status == 404 else pool
    response = await api.post("/v1/tasks", json={"pool": target_pool, **body})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert await count_tasks(runtime, pool) == 0


async def test_malformed_json_is_a_clear_400(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/v1/tasks", content=b'{"pool": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


async def test_oversized_payload_is_refused(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    limit = runtime.settings.max_payload_bytes
    # Over the limit but within the body margin: refused by the service, naming size and limit.
    response = await submit(api, pool, args=["x" * (limit + 10)])
    assert response.status_code == 413
    error = response.json()["error"]
    assert str(limit) in error and f"are {limit + 10 + 6} bytes" in error  # ["…"] and {}
    # Far over: refused before the body is even read.
    response = await submit(api, pool, kwargs={"blob": "x" * (limit * 4)})
    assert response.status_code == 413
    assert "request body too large" in response.json()["error"]
    # Just under the limit is fine.
    response = await submit(api, pool, args=["x" * (limit - 100)])
    assert response.status_code == 201
    assert await count_tasks(runtime, pool) == 1


async def test_idempotency_key_returns_the_same_task(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    first = await submit(api, pool, idempotency_key="order-42")
    again = await submit(api, pool, idempotency_key="order-42", args=[1])
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]

    # Concurrent duplicates race on the unique constraint: every one gets the same task.
    responses: list[httpx.Response] = []

    async def one() -> None:
        responses.append(await submit(api, pool, idempotency_key="race"))

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(one)
    assert {r.status_code for r in responses} <= {200, 201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.status_code == 201 for r in responses) == 1
    assert await count_tasks(runtime, pool) == 2
    async with runtime.sessions() as session:
        outbox = select(func.count()).select_from(Outbox).join(Task, Task.id == Outbox.task_id)
        assert await session.scalar(outbox.where(Task.pool == pool)) == 2


async def test_batch_submit(api: httpx.AsyncClient, runtime: Runtime, pool: str) -> None:
    tasks = [{"pool": pool, "target": "jobs.demo:add", "args": [i]} for i in range(2000)]
    tasks[5]["idempotency_key"] = tasks[9]["idempotency_key"] = "dup"
    started = time.monotonic()
    response = await api.post("/v1/tasks/batch", json={"tasks": tasks})
    elapsed = time.monotonic() - started
    assert response.status_code == 201, response.text
    ids = response.json()["ids"]
    assert len(ids) == 2000 and ids[5] == ids[9] and len(set(ids)) == 1999
    assert await count_tasks(runtime, pool) == 1999
    assert elapsed < 20, f"a batch of 2000 tasks took {elapsed:.1f}s"
    listed = (await api.get(f"/v1/tasks/{ids[7]}")).json()
    assert listed["args"] == [7] and listed["state"] == "queued"
    [(attempt, available_at)] = await outbox_rows(runtime, ids[7])
    assert attempt == 1 and available_at == pytest.approx(listed["created_at"])

    # Resubmitting with a known key returns the existing task.
    again = await api.post("/v1/tasks/batch", json={"tasks": [tasks[5]]})
    assert again.json()["ids"] == [ids[5]]

    # One bad task refuses the whole batch, and says which.
    bad = [*tasks[:3], {"pool": pool, "target": "nope"}]
    response = await api.post("/v1/tasks/batch", json={"tasks": bad})
    assert response.status_code == 422
    assert response.json()["error"].startswith("task 3: invalid target")
    assert await count_tasks(runtime, pool) == 1999


async def test_cancel_queued_task(api: httpx.AsyncClient, runtime: Runtime, pool: str) -> None:
    task = (await submit(api, pool)).json()
    response = await api.post(f"/v1/tasks/{task['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"
    assert await outbox_rows(runtime, task["id"]) == []
    marker = runtime.keys.cancelled(pool, task["id"])
    assert await runtime.redis.exists(marker)
    assert 0 < await runtime.redis.ttl(marker) <= 86400
    view = (await api.get(f"/v1/tasks/{task['id']}")).json()
    assert view["state"] == "cancelled" and view["finished_at"] is not None

    again = await api.post(f"/v1/tasks/{task['id']}/cancel")
    assert again.status_code == 409
    assert "already cancelled" in again.json()["error"]
    history = (await api.get(f"/v1/tasks/{task['id']}/history")).json()
    assert [(h["from_state"], h["to_state"]) for h in history] == [
        (None, "queued"),
        ("queued", "cancelled"),
    ]
    assert (await api.post("/v1/tasks/nope/cancel")).status_code == 404


async def test_cancel_running_task_tells_its_agent(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    task = (await submit(api, pool)).json()
    agent_id = f"host-{task['id'][:8]}"
    await runtime.declare_agent_queue(agent_id)
    await apply_event(
        runtime, messages.Started(task_id=task["id"], attempt=1, agent_id=agent_id, at=time.time())
    )
    response = await api.post(f"/v1/tasks/{task['id']}/cancel")
    assert response.status_code == 200
    view = response.json()
    assert view["state"] == "running" and view["cancel_requested"] is True
    queue = await runtime.channel.get_queue(names.agent_queue(agent_id))
    delivery = await queue.get(timeout=5)
    assert delivery is not None
    await delivery.ack()
    control = messages.decode_control(delivery.body)
    assert (control.action, control.task_id, control.attempt) == ("cancel", task["id"], 1)


async def test_cancel_finished_task_conflicts(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    task = (await submit(api, pool)).json()
    await finish(runtime, task["id"])
    response = await api.post(f"/v1/tasks/{task['id']}/cancel")
    assert response.status_code == 409
    assert "already succeeded" in response.json()["error"]
    history = (await api.get(f"/v1/tasks/{task['id']}/history")).json()
    assert [h["to_state"] for h in history] == ["queued", "running", "succeeded"]
    assert history[1]["agent_id"] == "a"


async def test_long_poll_returns_when_the_task_finishes(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    task = (await submit(api, pool)).json()
    started = time.monotonic()
    quick = await api.get(f"/v1/tasks/{task['id']}", params={"wait": 0.2})
    assert quick.json()["state"] == "queued"
    assert time.monotonic() - started >= 0.2

    result: dict[str, object] = {}

    async def waiter() -> None:
        response = await api.get(f"/v1/tasks/{task['id']}", params={"wait": 30}, timeout=40)
        result.update(response.json())

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await finish(runtime, task["id"])
    assert result["state"] == "succeeded"
    assert result["result"] == {"ok": True}
    assert time.monotonic() - started < 10

    bad = await api.get(f"/v1/tasks/{task['id']}", params={"wait": -1})
    assert bad.status_code == 400


async def test_long_poll_wakes_on_notify(
    runtime: Runtime, api: httpx.AsyncClient, pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait ends on the events consumer's wake-up, well before its periodic re-check."""
    from rexec.dispatcher import service

    monkeypatch.setattr(service, "WAIT_RECHECK", 30.0)
    task = (await submit(api, pool)).json()
    views: list[TaskView] = []

    async def waiter() -> None:
        views.append(await service.wait_task(runtime, task["id"], 30))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        started = time.monotonic()
        await finish(runtime, task["id"])
    assert views[0].state is TaskState.SUCCEEDED
    assert time.monotonic() - started < 5


async def test_waiting_on_many_tasks_returns_once_all_are_terminal(
    runtime: Runtime, api: httpx.AsyncClient, pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rexec.dispatcher import service

    monkeypatch.setattr(service, "WAIT_RECHECK", 30.0)
    ids = [(await submit(api, pool)).json()["id"] for _ in range(3)]
    await finish(runtime, ids[0])
    quick = await api.post("/v1/tasks/wait", json={"ids": ids, "wait": 0.1})
    assert [t["state"] for t in quick.json()["tasks"]] == ["succeeded", "queued", "queued"]

    answer: dict[str, object] = {}

    async def waiter() -> None:
        response = await api.post("/v1/tasks/wait", json={"ids": ids, "wait": 30}, timeout=40)
        answer.update(response.json())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        await finish(runtime, ids[1])
        await anyio.wait_all_tasks_blocked()
        assert not answer, "one task is still queued: the wait goes on"
        started = time.monotonic()
        await finish(runtime, ids[2])
    assert [t["id"] for t in answer["tasks"]] == ids  # type: ignore[index]
    assert time.monotonic() - started < 5

    unknown = await api.post("/v1/tasks/wait", json={"ids": [ids[0], "nope"], "wait": 0})
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]


async def test_waiting_on_ten_thousand_ids_fits_in_one_request(
    api: httpx.AsyncClient, pool: str
) -> None:
    first = (await submit(api, pool)).json()["id"]
    ids = [first] * 10_000
    response = await api.post("/v1/tasks/wait", json={"ids": ids, "wait": 0})
    assert response.status_code == 200, response.text
    assert len(response.json()["tasks"]) == 10_000


async def test_a_task_names_its_secrets_and_only_names_reach_the_wire(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    from rexec.dispatcher.outbox import task_message

    response = await submit(api, pool, secrets=["db_password", "PGPASSWORD"])
    assert response.status_code == 201, response.text
    task = response.json()
    assert task["secrets"] == ["db_password", "PGPASSWORD"]
    plain = (await submit(api, pool)).json()
    assert plain["secrets"] == []
    async with runtime.sessions() as session:
        row = await session.get(Task, task["id"])
        plain_row = await session.get(Task, plain["id"])
        assert row is not None and plain_row is not None
        assert task_message(row, 1).secrets == ["db_password", "PGPASSWORD"]
        assert b"secrets" not in messages.encode(task_message(plain_row, 1))


@pytest.mark.parametrize(
    ("secrets", "message"),
    [
        (["db-password"], "invalid secret name 'db-password'"),
        (["ok", "ok"], "secret 'ok' is named twice"),
        ([f"s{i}" for i in range(65)], "at most 64 secrets"),
    ],
)
async def test_bad_secret_names_are_a_clear_422(
    api: httpx.AsyncClient, runtime: Runtime, pool: str, secrets: list[str], message: str
) -> None:
    response = await submit(api, pool, secrets=secrets)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]
    batch = await api.post(
        "/v1/tasks/batch", json={"tasks": [{"pool": pool, "target": "a:b", "secrets": secrets}]}
    )
    assert batch.status_code == 422 and message in batch.json()["error"]
    assert await count_tasks(runtime, pool) == 0


async def test_concurrent_submits_share_a_transaction_and_keep_their_own_errors(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    """Group commit: concurrent single submits are written together, yet each gets its own
    answer: an unknown pool fails only the submits naming it, an idempotency key stays one
    task, and every 201 is a stored task with its first outbox row."""
    bodies: list[dict[str, object]] = [{"pool": pool, "args": [i]} for i in range(24)]
    bodies += [{"pool": f"{pool}-missing"}] * 3
    bodies += [{"pool": pool, "idempotency_key": "once"}] * 5
    answers: list[httpx.Response | None] = [None] * len(bodies)

    async def one(index: int, body: dict[str, object]) -> None:
        answers[index] = await submit(api, **body)  # type: ignore[arg-type]

    batches_before = runtime.submits.batches if runtime.submits else 0
    async with anyio.create_task_group() as tg:
        for index, body in enumerate(bodies):
            tg.start_soon(one, index, body)
    responses = [a for a in answers if a is not None]
    plain, missing, keyed = responses[:24], responses[24:27], responses[27:]
    assert all(r.status_code == 201 for r in plain), [r.text for r in plain]
    for response in missing:
        assert response.status_code == 404
        assert f"unknown pool '{pool}-missing'" in response.json()["error"]
    assert sorted(r.status_code for r in keyed) == [200, 200, 200, 200, 201]
    assert len({r.json()["id"] for r in keyed}) == 1
    assert await count_tasks(runtime, pool) == 25
    for response in plain:
        assert [attempt for attempt, _ in await outbox_rows(runtime, response.json()["id"])] == [1]
    assert runtime.submits is not None
    assert runtime.submits.batches - batches_before < len(bodies), "submits were not grouped"
