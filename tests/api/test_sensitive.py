"""Sensitive tasks (arguments hidden from viewer keys) and the lookup of tasks by idempotency
key, against the real dispatcher."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from rexec.dispatcher.db.models import AuditEvent, Task
from rexec.dispatcher.runtime import Runtime
from rexec.schemas.api import Role, TaskView
from tests.api.test_auth import bearer, create_key
from tests.api.test_tasks import finish, submit

pytestmark = pytest.mark.anyio

CANARY = "canary-7f3a9c-do-not-show"


async def test_a_viewer_never_sees_a_sensitive_tasks_arguments(
    api: httpx.AsyncClient, runtime: Runtime, pool: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="rexec")
    viewer = bearer((await create_key(api, Role.VIEWER, name="eyes"))["secret"])
    submitter = bearer((await create_key(api, Role.SUBMITTER, name="hands"))["secret"])
    created = await api.post(
        "/v1/tasks",
        json={
            "pool": pool,
            "target": "jobs.demo:add",
            "args": [CANARY],
            "kwargs": {"password": CANARY},
            "sensitive": True,
            "idempotency_key": "secret-job",
        },
        headers=submitter,
    )
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["sensitive"] is True and task["kwargs"] == {"password": CANARY}
    command = await api.post(
        "/v1/tasks",
        json={"pool": pool, "command": ["psql", f"--password={CANARY}"], "sensitive": True},
        headers=submitter,
    )
    assert command.status_code == 201, command.text
    plain = (await submit(api, pool, args=[1], kwargs={"x": "shown"})).json()
    assert plain["sensitive"] is False
    ids = [task["id"], command.json()["id"], plain["id"]]
    await finish(runtime, task["id"])
    cancelled = await api.post(f"/v1/tasks/{command.json()['id']}/cancel", headers=submitter)
    assert cancelled.status_code == 200 and CANARY in cancelled.text  # the submitter's answer

    answers = [
        await api.get(f"/v1/tasks/{task['id']}", headers=viewer),
        await api.get(f"/v1/tasks/{task['id']}", params={"wait": 0.1}, headers=viewer),
        await api.get("/v1/tasks", params={"pool": pool}, headers=viewer),
        await api.get(
            "/v1/tasks", params={"pool": pool, "idempotency_key": "secret-job"}, headers=viewer
        ),
        await api.post("/v1/tasks/wait", json={"ids": ids, "wait": 0}, headers=viewer),
        await api.get(f"/v1/tasks/{task['id']}/history", headers=viewer),
        await api.get("/v1/tasks/changes", params={"after": 0, "pool": pool}, headers=viewer),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert CANARY not in answer.text, answer.request.url
    views = {v["id"]: v for v in answers[4].json()["tasks"]}
    hidden, hidden_command, shown = (views[i] for i in ids)
    assert (hidden["args"], hidden["kwargs"], hidden["sensitive"]) == ([], {}, True)
    assert (hidden_command["argv"], hidden_command["target"]) == ([], "psql")
    assert shown["args"] == [1] and shown["kwargs"] == {"x": "shown"}  # not sensitive: shown
    assert hidden["state"] == "succeeded" and hidden["result"] == {"ok": True}  # the rest reads

    # Submitters and admins see the arguments.
    for headers in (submitter, {}):
        got = (await api.get(f"/v1/tasks/{task['id']}", headers=headers)).json()
        assert got["args"] == [CANARY] and got["kwargs"] == {"password": CANARY}
        listed = (await api.get("/v1/tasks", params={"pool": pool}, headers=headers)).json()
        assert any(v.get("argv") == ["psql", f"--password={CANARY}"] for v in listed)

    # Neither the audit trail nor the dispatcher's log lines hold the arguments.
    async with runtime.sessions() as session:
        details = list(await session.scalars(select(AuditEvent.detail_json)))
        targets = list(await session.scalars(select(AuditEvent.target)))
        row = await session.get(Task, task["id"])
    assert details and not any(CANARY in d for d in details + targets)
    assert row is not None and row.sensitive is True  # stored, and sent to the agent as any
    audit = await api.get("/v1/audit")
    assert audit.status_code == 200 and CANARY not in audit.text
    assert caplog.records, "no log line captured: the check below would prove nothing"
    for record in caplog.records:
        assert CANARY not in repr(vars(record)), record.getMessage()


async def test_the_cli_says_the_arguments_are_hidden() -> None:
    from rich.console import Console

    from rexec.client import cli_format as fmt

    view = TaskView(
        id="t" * 32,
        pool="p",
        kind="function",
        target="jobs.demo:add",
        argv=[],
        args=[],
        kwargs={},
        state="queued",  # type: ignore[arg-type]
        attempt=1,
        max_attempts=3,
        agent_id=None,
        result=None,
        error=None,
        timeout=None,
        idempotency_key=None,
        created_at=0.0,
        started_at=None,
        finished_at=None,
        sensitive=True,
    )

    def text(renderable: Any) -> str:
        console = Console(width=200, record=True)
        console.print(renderable)
        return console.export_text()

    assert "args      (sensitive: hidden)" in text(fmt.task_detail(view))
    command = TaskView(**{**_fields(view), "kind": "command", "target": "psql"})
    assert "psql (sensitive: hidden)" in text(fmt.tasks_table([command]))
    shown = TaskView(**{**_fields(view), "args": [1]})
    assert "(sensitive: hidden)" not in text(fmt.task_detail(shown))


def _fields(view: TaskView) -> dict[str, Any]:
    return {name: getattr(view, name) for name in view.__struct_fields__}


async def test_tasks_are_found_by_idempotency_key(
    api: httpx.AsyncClient, runtime: Runtime, pool: str
) -> None:
    other = f"{pool}-b"
    assert (await api.post("/v1/pools", json={"name": other})).status_code == 201
    mine = (await submit(api, pool, idempotency_key="dag.run.1")).json()
    theirs = (await submit(api, other, idempotency_key="dag.run.1")).json()
    await submit(api, pool, idempotency_key="dag.run.2")
    await submit(api, pool)

    def ids(response: httpx.Response) -> list[str]:
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()]

    keyed = {"pool": pool, "idempotency_key": "dag.run.1"}
    assert ids(await api.get("/v1/tasks", params=keyed)) == [mine["id"]]
    everywhere = await api.get("/v1/tasks", params={"idempotency_key": "dag.run.1"})
    assert set(ids(everywhere)) >= {mine["id"], theirs["id"]}
    assert ids(await api.get("/v1/tasks", params={**keyed, "state": "queued"})) == [mine["id"]]
    assert ids(await api.get("/v1/tasks", params={**keyed, "state": "running"})) == []
    missing = await api.get("/v1/tasks", params={"pool": pool, "idempotency_key": "nope"})
    assert ids(missing) == []
    await finish(runtime, mine["id"])
    done = (await api.get("/v1/tasks", params=keyed)).json()
    assert [t["state"] for t in done] == ["succeeded"]
    twice = await api.get("/v1/tasks?idempotency_key=a&idempotency_key=b")
    assert twice.status_code == 400 and "given 2 times" in twice.json()["error"]


async def test_the_client_submits_sensitive_tasks_and_finds_them_by_key(
    runtime: Runtime, api: httpx.AsyncClient, pool: str
) -> None:
    from rexec.client import AsyncRexecClient
    from rexec.dispatcher.api import create_app

    secret = (await create_key(api, Role.VIEWER))["secret"]
    transport = httpx.ASGITransport(app=create_app(runtime))  # type: ignore[arg-type]
    async with (
        AsyncRexecClient("http://rexec.test", transport=transport) as admin,
        AsyncRexecClient("http://rexec.test", api_key=secret, transport=transport) as viewer,
    ):
        task = await admin.submit(
            pool, "jobs.math:add", kwargs={"token": CANARY}, idempotency_key="k", sensitive=True
        )
        assert task.sensitive and task.kwargs == {"token": CANARY}
        [found] = await viewer.list_tasks(pool=pool, idempotency_key="k")
        assert found.id == task.id and found.sensitive and found.kwargs == {}
        assert (await viewer.get(task.id)).kwargs == {}
        assert (await admin.get(task.id)).kwargs == {"token": CANARY}
        assert await admin.list_tasks(pool=pool, idempotency_key="other") == []
