"""Dispatcher faults: kill -9 mid-run, the window between commit and publish, duplicate
publishes of one attempt, and two replicas of which the watchdog's leader is killed."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import anyio
import pytest
from sqlalchemy import select

from rexec.client import RexecClient
from rexec.dispatcher.db.engine import make_engine, make_sessionmaker
from rexec.dispatcher.db.models import Leader, Task
from rexec.dispatcher.outbox import task_message
from rexec.dispatcher.signing_key import load_signer
from rexec.schemas import messages, names
from rexec.schemas.api import SubmitTask, TaskState
from rexec.schemas.settings import Settings
from rexec.schemas.signing import SIGNATURE_HEADER
from tests.e2e.conftest import Plane
from tests.faults.conftest import ALLOW, FAST, assert_each_terminal_once
from tests.faults.test_agent_faults import online, running_on
from tests.support import free_port, wait_until


def record_tasks(pool: str, runs: Path, count: int, seconds: float = 0.05) -> list[SubmitTask]:
    return [
        SubmitTask(
            pool=pool, target="tests.faults.tasks:record", args=[str(runs), f"t{i}", seconds]
        )
        for i in range(count)
    ]


def executions(runs: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in runs.iterdir():
        name = path.name.split(".")[0]
        counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


def test_kill_9_the_dispatcher_mid_run_loses_nothing(
    plane: Plane, pool_name: str, runs: Path
) -> None:
    plane.client.create_pool(pool_name)
    for i in range(2):
        plane.start_agent(pool_name, "--concurrency", "4", *ALLOW, name=f"agent{i}")
    online(plane, pool_name, 2)
    ids = plane.client.submit_many(record_tasks(pool_name, runs, 300, seconds=0.02))
    wait_until(lambda: sum(executions(runs).values()) >= 50, 30, "the run to be under way")

    plane.dispatcher.signal(signal.SIGKILL)
    plane.dispatcher.popen.wait()
    plane.dispatcher = plane.start_dispatcher()  # same database; events waited in the queue

    done = plane.client.wait(ids, timeout=120)
    assert [t.state for t in done] == [TaskState.SUCCEEDED] * 300
    assert_each_terminal_once(plane, done[::10])
    assert set(executions(runs)) == {f"t{i}" for i in range(300)}, "every task ran"


def test_tasks_committed_but_not_published_when_the_dispatcher_dies_are_published_after(
    plane: Plane, pool_name: str, runs: Path
) -> None:
    """Drained pools hold tasks in the outbox: committed, not published, like a crash between
    the commit and the publish. Kill -9 the dispatcher there; the next one publishes them."""
    plane.client.create_pool(pool_name)
    plane.client.drain_pool(pool_name)
    ids = plane.client.submit_many(record_tasks(pool_name, runs, 50))
    plane.dispatcher.signal(signal.SIGKILL)
    plane.dispatcher.popen.wait()
    plane.dispatcher = plane.start_dispatcher()
    plane.start_agent(pool_name, "--concurrency", "4", *ALLOW)
    online(plane, pool_name, 1)
    assert {t.state for t in plane.client.wait(ids, timeout=0)} == {TaskState.QUEUED}
    plane.client.resume_pool(pool_name)

    done = plane.client.wait(ids, timeout=60)
    assert [t.state for t in done] == [TaskState.SUCCEEDED] * 50
    assert executions(runs) == {f"t{i}": 1 for i in range(50)}


def test_an_attempt_published_twice_runs_once(plane: Plane, pool_name: str, runs: Path) -> None:
    """A crash after the publish and before the outbox row is cleared publishes the same
    attempt again: agents recognise the duplicate by its lease and drop it."""
    plane.client.create_pool(pool_name)
    plane.client.drain_pool(pool_name)
    ids = plane.client.submit_many(record_tasks(pool_name, runs, 40, seconds=0.3))
    anyio.run(publish_as_the_relay_would, plane.settings, ids)  # first copy, as before a crash
    plane.client.resume_pool(pool_name)  # the relay publishes the same attempts again
    for i in range(2):
        plane.start_agent(pool_name, "--concurrency", "4", *ALLOW, name=f"agent{i}")

    done = plane.client.wait(ids, timeout=60)
    assert [(t.state, t.attempt) for t in done] == [(TaskState.SUCCEEDED, 1)] * 40
    assert executions(runs) == {f"t{i}": 1 for i in range(40)}, "each attempt ran once"
    assert_each_terminal_once(plane, done)


async def publish_as_the_relay_would(settings: Settings, ids: list[str]) -> None:
    engine = make_engine(settings.database_url)
    try:
        sessions = make_sessionmaker(engine)
        signer = await load_signer(settings, sessions)
        async with sessions() as session:
            tasks = (await session.scalars(select(Task).where(Task.id.in_(ids)))).all()
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(names.TASKS_EXCHANGE)
            for task in tasks:
                body = messages.encode(task_message(task, task.attempt))
                await exchange.publish(
                    aio_pika.Message(
                        body, delivery_mode=2, headers={SIGNATURE_HEADER: signer.sign(body)}
                    ),
                    routing_key=task.pool,
                )
    finally:
        await engine.dispose()


@pytest.fixture
def pg_plane(
    postgres_url: str, amqp_url: str, redis_prefix: str, tmp_path: Path
) -> Iterator[Plane]:
    from rexec.schemas.settings import load_settings
    from tests.conftest import REDIS_URL

    settings = load_settings(
        {},
        database_url=postgres_url,
        amqp_url=amqp_url,
        redis_url=REDIS_URL,
        redis_prefix=f"{redis_prefix}-two",
        **FAST,
    )
    plane = Plane(settings, tmp_path)
    yield plane
    plane.close()


def test_two_dispatchers_and_the_watchdog_leader_killed(
    pg_plane: Plane, pool_name: str, tmp_path: Path
) -> None:
    plane = pg_plane
    second_port = free_port()
    second = plane.start_dispatcher(api_port=second_port)
    ports = {plane.dispatcher.pid: plane.settings.api_port, second.pid: second_port}
    replicas = {plane.dispatcher.pid: plane.dispatcher, second.pid: second}
    leader_pid = wait_until(
        lambda: anyio.run(watchdog_leader_pid, plane.settings), 20, "a watchdog leader"
    )
    survivor_pid = next(pid for pid in replicas if pid != leader_pid)

    plane.client.create_pool(pool_name)
    victim = plane.start_agent(pool_name, "--concurrency", "2", *ALLOW, name="victim")
    online(plane, pool_name, 1)
    markers = [tmp_path / f"m{i}" for i in range(2)]
    ids = [
        plane.client.submit(pool_name, "tests.faults.tasks:slow_once", args=[str(m), 120]).id
        for m in markers
    ]
    running_on(plane, ids)
    plane.start_agent(pool_name, "--concurrency", "2", *ALLOW, name="survivor")
    online(plane, pool_name, 2)

    replicas[leader_pid].signal(signal.SIGKILL)
    replicas[leader_pid].popen.wait()
    victim.signal(signal.SIGKILL)  # only the remaining replica's watchdog can save these now
    with RexecClient(f"http://127.0.0.1:{ports[survivor_pid]}") as client:
        done = client.wait(ids, timeout=60)
        assert [(t.state, t.result, t.attempt) for t in done] == [(TaskState.SUCCEEDED, 2, 2)] * 2
        assert_each_terminal_once(client, done)
        more = client.submit_many(
            [SubmitTask(pool=pool_name, target="tests.tasks:add", args=[i, i]) for i in range(20)]
        )
        assert [t.result for t in client.wait(more, timeout=60)] == [2 * i for i in range(20)]
    assert anyio.run(watchdog_leader_pid, plane.settings) == survivor_pid


async def watchdog_leader_pid(settings: Settings) -> int | None:
    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            row = await session.scalar(select(Leader).where(Leader.name == "watchdog"))
    finally:
        await engine.dispose()
    if row is None or row.expires_at < time.time():
        return None
    return int(row.holder.split(":")[1])
