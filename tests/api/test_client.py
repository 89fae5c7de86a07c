"""The Python client (async flavour here; the sync one in tests/cli) against the real app."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from rexec.client import AsyncRexecClient, RexecError, SubmitTask, TaskState
from rexec.dispatcher import statemachine, transitions
from rexec.dispatcher.api import create_app
from rexec.dispatcher.db.models import Task
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages
from tests.support import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
async def rexec(runtime: Runtime) -> AsyncIterator[AsyncRexecClient]:
    transport = httpx.ASGITransport(app=create_app(runtime))  # type: ignore[arg-type]
    async with AsyncRexecClient("http://rexec.test", transport=transport) as client:
        yield client


async def finish(rt: Runtime, task_id: str) -> None:
    now = time.time()
    for event in (
        messages.Started(task_id=task_id, attempt=1, agent_id="a", at=now),
        messages.Succeeded(task_id=task_id, attempt=1, agent_id="a", at=now, result=3),
    ):
        async with rt.sessions.begin() as session:
            task = await session.get(Task, task_id)
            assert task is not None
            decision = statemachine.on_event(transitions.snapshot(task), event)
            assert isinstance(decision, statemachine.Transition)
            transitions.apply(session, task, decision, now, result_json="3")
        rt.notify_applied()


async def test_async_client_verbs(
    rexec: AsyncRexecClient, runtime: Runtime, pool_name: str
) -> None:
    pool = await rexec.create_pool(pool_name, "for the client test")
    assert pool.name == pool_name and pool.description == "for the client test"
    with pytest.raises(RexecError) as conflict:
        await rexec.create_pool(pool_name)
    assert conflict.value.status == 409 and "already exists" in conflict.value.message

    task = await rexec.submit(
        pool_name, "jobs.math:add", args=[1, 2], timeout=10, idempotency_key="k"
    )
    assert task.state is TaskState.QUEUED and task.args == [1, 2] and task.timeout == 10
    assert (await rexec.submit(pool_name, "jobs.math:add", idempotency_key="k")).id == task.id
    command = await rexec.submit(pool_name, command=["echo", "hi"], max_attempts=1)
    assert command.kind == "command" and command.max_attempts == 1
    ids = await rexec.submit_many(
        [SubmitTask(pool=pool_name, target="jobs.math:add", args=[i]) for i in range(10)]
    )
    assert len(ids) == 10
    assert (await rexec.get(ids[3])).args == [3]

    listed = await rexec.list_tasks(pool=pool_name, limit=5)
    assert len(listed) == 5
    assert {t.state for t in await rexec.list_tasks(pool=pool_name, state="queued")} == {
        TaskState.QUEUED
    }

    async with anyio.create_task_group() as tg:
        tg.start_soon(finish, runtime, task.id)
        [done] = await rexec.wait([task.id], timeout=20)
    assert done.state is TaskState.SUCCEEDED and done.result == 3
    [still] = await rexec.wait(ids[0], timeout=0.1)
    assert still.state is TaskState.QUEUED

    cancelled = await rexec.cancel(ids[1])
    assert cancelled.state is TaskState.CANCELLED
    history = await rexec.history(ids[1])
    assert [h.to_state for h in history] == ["queued", "cancelled"]
    with pytest.raises(RexecError) as again:
        await rexec.cancel(ids[1])
    assert again.value.status == 409 and "already cancelled" in again.value.message

    assert (await rexec.drain_pool(pool_name)).draining is True
    assert (await rexec.resume_pool(pool_name)).draining is False
    pools = {p.name: p for p in await rexec.list_pools()}
    assert pools[pool_name].tasks["queued"] == 10

    created = await rexec.create_token(pool_name, "ci", expires_in=60)
    assert created.secret.startswith("rexec_at_")
    assert [t.id for t in await rexec.list_tokens(pool=pool_name)] == [created.token.id]
    assert (await rexec.revoke_token(created.token.id)).state == "revoked"
    assert await rexec.list_agents(pool=pool_name) == []
    assert await rexec.health() == {"status": "ok"}

    with pytest.raises(RexecError) as missing:
        await rexec.get("nope")
    assert missing.value.status == 404 and "unknown task 'nope'" in missing.value.message
    with pytest.raises(RexecError) as unknown:
        await rexec.submit("no-such-pool", "a:b")
    assert "rexec pool create no-such-pool" in unknown.value.message


async def test_unreachable_api_says_what_to_do() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with AsyncRexecClient(url) as rexec:
        with pytest.raises(RexecError) as error:
            await rexec.list_pools()
    assert error.value.status is None
    assert f"the rexec API at {url} is unreachable" in error.value.message
    assert "rexec serve" in error.value.message
