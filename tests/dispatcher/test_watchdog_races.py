"""The watchdog against writers that commit between its read and its write.

Each test holds the watchdog at the one place where it has read a task but not written it yet
(its snapshot for the state machine, wrapped), and there lets another dispatcher replica (a thread
with an engine and event loop of its own) commit: an agent's event through the events
consumer's own code, or a takeover of the leader lease. Then the watchdog writes. Whatever it
decided on a row that changed, or while it no longer leads, must not land.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import anyio
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from rexec.dispatcher import events, statemachine, transitions
from rexec.dispatcher.db.engine import make_engine, make_sessionmaker
from rexec.dispatcher.db.models import Leader, Outbox, Task, TaskTransition
from rexec.dispatcher.leadership import LeaderLease
from rexec.dispatcher.metrics import Metrics
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages
from rexec.schemas.api import TaskState
from tests.dispatcher.test_relay_events import make_pool, make_task
from tests.dispatcher.test_watchdog import leading_watchdog, task_row

OTHER_REPLICA_DEADLINE = 20.0

Work = Callable[["OtherReplica"], Awaitable[None]]


@dataclass
class OtherReplica:
    """What the events consumer's ``apply_events`` touches of a runtime, on an engine of its
    own: another dispatcher process, as far as the database can tell."""

    sessions: async_sessionmaker[AsyncSession]
    metrics: Metrics = field(default_factory=Metrics)
    controls: list[messages.Control] = field(default_factory=list)

    def notify_applied(self) -> None:
        """No long-polls wait on this replica."""

    def wake_relay(self) -> None:
        """No relay runs beside this replica."""

    async def publish_control(self, agent_id: str, control: messages.Control) -> None:
        self.controls.append(control)

    async def apply(self, *batch: messages.Event) -> None:
        """Apply events exactly as the events consumer does."""
        await events.apply_events(cast(Runtime, self), list(batch))


def in_other_replica(url: str, work: Work) -> None:
    """Run ``work`` to its commit in another replica while the caller's event loop waits.

    The watchdog is held at its decision for exactly as long as the other replica needs, so
    the interleaving is the same on every run. A replica that cannot finish (it waits on a
    lock the held watchdog has) fails the test instead of hanging it.
    """
    errors: list[BaseException] = []

    def run() -> None:
        async def main() -> None:
            engine = make_engine(url)
            try:
                await work(OtherReplica(make_sessionmaker(engine)))
            finally:
                await engine.dispose()

        try:
            anyio.run(main)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="other-replica", daemon=True)
    thread.start()
    thread.join(OTHER_REPLICA_DEADLINE)
    if thread.is_alive():
        raise AssertionError(
            f"the other replica did not commit within {OTHER_REPLICA_DEADLINE}s: "
            "it waits on a lock the watchdog holds between its read and its write"
        )
    if errors:
        raise errors[0]


def hold_after_read(
    monkeypatch: pytest.MonkeyPatch, task_id: str, url: str, work: Work
) -> list[statemachine.Snapshot]:
    """Let another replica commit ``work`` the moment the watchdog, having read ``task_id``,
    takes its snapshot for the state machine: after its read, before its decision and write.

    Only that task triggers it (the session's database holds other tests' tasks too), and
    only once (the other replica's events consumer takes snapshots as well)."""
    real = transitions.snapshot
    seen: list[statemachine.Snapshot] = []

    def held(task: transitions.Fenced) -> statemachine.Snapshot:
        if task.id == task_id and not seen:
            seen.append(real(task))
            in_other_replica(url, work)
            return seen[0]
        return real(task)

    monkeypatch.setattr(transitions, "snapshot", held)
    return seen


def succeeded(task_id: str, agent_id: str) -> messages.Succeeded:
    return messages.Succeeded(
        task_id=task_id, attempt=1, agent_id=agent_id, at=time.time(), result=3
    )


async def outbox_rows(rt: Runtime, task_id: str) -> int:
    async with rt.sessions() as session:
        count = await session.scalar(
            select(func.count()).select_from(Outbox).where(Outbox.task_id == task_id)
        )
    return int(count or 0)


async def history(rt: Runtime, task_id: str) -> list[tuple[str, str | None, int]]:
    async with rt.sessions() as session:
        rows = await session.execute(
            select(TaskTransition.to_state, TaskTransition.reason, TaskTransition.attempt)
            .where(TaskTransition.task_id == task_id)
            .order_by(TaskTransition.id)
        )
    return [(to, reason, attempt) for to, reason, attempt in rows]


def lost_races(rt: Runtime, action: str, cause: str) -> float:
    value = rt.metrics.registry.get_sample_value(
        "rexec_watchdog_lost_races_total", {"action": action, "cause": cause}
    )
    return value or 0.0


def logged(caplog: pytest.LogCaptureFixture, text: str, task_id: str) -> bool:
    return any(
        r.name == "rexec.watchdog"
        and text in r.getMessage()
        and task_id in str(getattr(r, "tasks", getattr(r, "task_id", "")))
        for r in caplog.records
    )


async def assert_success_kept(rt: Runtime, pool: str, task_id: str, agent: str) -> None:
    task = await task_row(rt, task_id)
    assert (task.state, task.attempt, task.agent_id, task.result_json) == (
        "succeeded",
        1,
        agent,
        "3",
    ), "the watchdog overwrote a success committed after it read the row"
    assert await outbox_rows(rt, task_id) == 0, "a second attempt was put in the outbox"
    assert await history(rt, task_id) == [("succeeded", "succeeded", 1)]
    assert await rt.redis.get(rt.keys.lease(pool, task_id, 1)) is None, (
        "the finished attempt's lease was tombstoned as if it had been taken over"
    )


@pytest.mark.anyio
async def test_a_success_committed_while_the_watchdog_judges_a_dead_agent_stands(
    rt: Runtime,
    pool_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The agent's key expired just as its last result came in: the result wins."""
    caplog.set_level(logging.INFO, "rexec.watchdog")
    agent = f"late-{pool_name}"
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, TaskState.RUNNING, agent=agent, outbox=False)
    watchdog = await leading_watchdog(rt)

    async def result_arrives(replica: OtherReplica) -> None:
        await replica.apply(succeeded(task_id, agent))

    seen = hold_after_read(monkeypatch, task_id, rt.settings.database_url, result_arrives)
    await watchdog.requeue_lost()

    assert [s.state for s in seen] == [TaskState.RUNNING], "the watchdog read it running"
    await assert_success_kept(rt, pool_name, task_id, agent)
    assert lost_races(rt, "agent_lost", "task_changed") == 1
    assert not logged(caplog, "handed back", task_id), "a requeue that did not happen was logged"
    assert logged(caplog, "lost the race", task_id)


@pytest.mark.anyio
async def test_a_success_committed_while_the_timeout_backstop_judges_stands(
    rt: Runtime,
    pool_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An attempt long past its timeout reports success at the last moment: it stands."""
    caplog.set_level(logging.INFO, "rexec.watchdog")
    agent = f"slow-{pool_name}"
    await make_pool(rt, pool_name)
    await rt.redis.set(rt.keys.agent(agent), b"{}", ex=30)
    task_id = await make_task(rt, pool_name, TaskState.RUNNING, agent=agent, outbox=False)
    async with rt.sessions.begin() as session:
        await session.execute(
            update(Task).where(Task.id == task_id).values(timeout=1.0, started_at=time.time() - 120)
        )
    watchdog = await leading_watchdog(rt)

    async def result_arrives(replica: OtherReplica) -> None:
        await replica.apply(succeeded(task_id, agent))

    seen = hold_after_read(monkeypatch, task_id, rt.settings.database_url, result_arrives)
    await watchdog.backstop_timeouts()

    assert [s.state for s in seen] == [TaskState.RUNNING], "the watchdog read it running"
    await assert_success_kept(rt, pool_name, task_id, agent)
    assert lost_races(rt, "timeout_backstop", "task_changed") == 1
    assert logged(caplog, "lost the race", task_id)


@pytest.mark.anyio
async def test_a_start_committed_while_the_watchdog_expires_a_queued_task_stands(
    rt: Runtime,
    pool_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task that started just before its start deadline runs on: it is not expired
    under its agent (which would run it unrecorded) nor robbed of its outbox row."""
    caplog.set_level(logging.INFO, "rexec.watchdog")
    agent = f"just-in-time-{pool_name}"
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name)
    async with rt.sessions.begin() as session:
        await session.execute(
            update(Task).where(Task.id == task_id).values(expires_at=time.time() - 1)
        )
    watchdog = await leading_watchdog(rt)

    async def start_arrives(replica: OtherReplica) -> None:
        await replica.apply(
            messages.Started(task_id=task_id, attempt=1, agent_id=agent, at=time.time())
        )

    seen = hold_after_read(monkeypatch, task_id, rt.settings.database_url, start_arrives)
    await watchdog.expire_queued()

    assert [s.state for s in seen] == [TaskState.QUEUED], "the watchdog read it queued"
    task = await task_row(rt, task_id)
    assert (task.state, task.attempt, task.agent_id) == ("running", 1, agent), (
        "the watchdog expired a task that had started after it read the row"
    )
    assert await history(rt, task_id) == [("running", "started", 1)]
    assert not await rt.redis.exists(rt.keys.cancelled(pool_name, task_id)), (
        "the running attempt was marked expired for agents"
    )
    assert lost_races(rt, "expiry", "task_changed") == 1
    assert logged(caplog, "lost the race", task_id)


@pytest.mark.anyio
async def test_a_leader_deposed_between_its_check_and_its_write_writes_nothing(
    rt: Runtime,
    pool_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The leader paused past its lease after checking it; another replica took over.

    Its writes are fenced by the lease's epoch at commit, not at the start of the
    transaction: the task the new leader now owns is left exactly as it was."""
    caplog.set_level(logging.INFO, "rexec.watchdog")
    agent = f"paused-leader-{pool_name}"
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, TaskState.RUNNING, agent=agent, outbox=False)
    watchdog = await leading_watchdog(rt)
    name, epoch = watchdog.lease.name, watchdog.lease.epoch
    taken_over: list[int | None] = []

    async def take_over(replica: OtherReplica) -> None:
        async with replica.sessions.begin() as session:  # the old leader's lease ran out
            await session.execute(update(Leader).where(Leader.name == name).values(expires_at=0))
        successor = LeaderLease(replica.sessions, name, "replica-b", ttl=60)
        assert await successor.acquire()
        taken_over.append(successor.epoch)

    seen = hold_after_read(monkeypatch, task_id, rt.settings.database_url, take_over)
    await watchdog.requeue_lost()

    assert [s.state for s in seen] == [TaskState.RUNNING], "the watchdog read it running"

    assert taken_over == [(epoch or 0) + 1]
    task = await task_row(rt, task_id)
    assert (task.state, task.attempt, task.agent_id) == ("running", 1, agent), (
        "a deposed leader requeued a task after another replica took over"
    )
    assert await outbox_rows(rt, task_id) == 0
    assert await history(rt, task_id) == []
    assert await rt.redis.get(rt.keys.lease(pool_name, task_id, 1)) is None
    assert lost_races(rt, "agent_lost", "deposed") == 1
    assert any(r.name == "rexec.watchdog" and "deposed" in r.getMessage() for r in caplog.records)
    assert watchdog.lease.epoch is None, "the deposed replica no longer believes it leads"
