"""Dead-lettered task messages: a crash loop of a pool's only agent while a backlog waits.

A quorum queue counts every return of a delivery (a nack with requeue, and each delivery an
agent held when its connection died) and dead-letters the message to ``rexec.dead.<pool>``
past ``x-delivery-limit``. The task of a dead-lettered message must not stay ``queued``
forever: the dispatcher reads the dead letter and publishes the attempt again or ends the task
``failed`` with the reason.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import anyio
import pytest

from rexec.schemas import names
from rexec.schemas.api import TaskState, TaskView
from rexec.schemas.settings import Settings
from rexec.schemas.signing import Signer, generate_private_key
from tests.e2e.conftest import Plane
from tests.faults.conftest import ALLOW, assert_each_terminal_once
from tests.support import Process, wait_until

DELIVERY_LIMIT = 0
"""The broker dead-letters a message at its first return (RabbitMQ 3.10: a limit of L lets a
message be delivered L + 1 times; returned deliveries go first, so under kill -9 alone a
message is returned about once per crash that held it, and the default of 5 needs six)."""
CRASHES = 4
HOLD = "tests.faults.tasks:hold"
BACKLOG = 12


@pytest.fixture
def plane(fault_settings: Settings, tmp_path: Path) -> Iterator[Plane]:
    plane = Plane(fault_settings, tmp_path, env={"REXEC_DELIVERY_LIMIT": str(DELIVERY_LIMIT)})
    yield plane
    plane.close()


def queue_depth(amqp_url: str, queue: str) -> int:
    async def depth() -> int:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result.message_count or 0

    return anyio.run(depth)


def wait_holding_a_delivery(agent: Process, what: str) -> None:
    """Until the agent holds a delivery unacked that it cannot start: one of its tasks waited
    for a slot long enough that the intake paused (every slot runs a task)."""
    wait_until(
        lambda: "intake paused" in agent.output() or agent.popen.poll() is not None, 60, what
    )
    assert agent.popen.poll() is None, f"the agent exited by itself:\n{agent.output()}"


def reasons(plane: Plane, task_id: str) -> list[str]:
    """The reasons of the task's transitions, oldest first."""
    return [h.reason or "" for h in plane.client.history(task_id)]


def settle(plane: Plane, ids: list[str], timeout: float) -> list[TaskView]:
    """Every task once all ended; on timeout, fail saying which are still queued and what
    the pool's dead queue holds."""

    def ended() -> list[TaskView] | None:
        tasks = [plane.client.get(i) for i in ids]
        return tasks if all(t.state.terminal for t in tasks) else None

    try:
        return wait_until(ended, timeout, "every task of the backlog to end")
    except AssertionError:
        tasks = [plane.client.get(i) for i in ids]
        queued = [t.id for t in tasks if t.state is TaskState.QUEUED]
        pool = tasks[0].pool
        dead = queue_depth(plane.settings.amqp_url, names.dead_queue(pool))
        raise AssertionError(
            f"{len(queued)} of {len(ids)} tasks still queued, {dead} message(s) in "
            f"{names.dead_queue(pool)}: {[(t.id, t.state.value, t.attempt) for t in tasks]}"
        ) from None


def test_a_crash_loop_of_the_only_agent_leaves_no_task_queued(
    plane: Plane, pool_name: str, tmp_path: Path
) -> None:
    """The pool's only agent is killed with -9 each time it holds deliveries it has not
    started, and restarted, while a backlog waits. Tasks with attempts to spare end
    succeeded; tasks of one attempt end succeeded or failed, saying why."""
    plane.client.create_pool(pool_name)
    release = tmp_path / "release"
    spare = [
        plane.client.submit(
            pool_name, HOLD, args=[str(release)], max_attempts=20, retry_backoff=0.1
        ).id
        for _ in range(BACKLOG // 2)
    ]
    single = [
        plane.client.submit(pool_name, HOLD, args=[str(release)], max_attempts=1).id
        for _ in range(BACKLOG // 2)
    ]
    for crash in range(CRASHES):
        agent = plane.start_agent(pool_name, "--concurrency", "2", *ALLOW, name=f"crash{crash}")
        wait_holding_a_delivery(agent, f"crash-looping agent {crash} to hold a delivery")
        agent.signal(signal.SIGKILL)
        agent.popen.wait(10)

    release.touch()
    plane.start_agent(pool_name, "--concurrency", "2", *ALLOW, name="survivor")
    done = settle(plane, spare + single, 60)

    assert_each_terminal_once(plane, done)
    by_id = {t.id: t for t in done}
    histories = {t.id: reasons(plane, t.id) for t in done}
    dead = [i for i, r in histories.items() if any(x.startswith("dead_lettered") for x in r)]
    assert dead, "precondition: the broker dead-lettered task messages of the crash loop"
    assert all(by_id[i].state is TaskState.SUCCEEDED for i in spare), [by_id[i] for i in spare]
    for task_id in single:
        task = by_id[task_id]
        if task.state is TaskState.SUCCEEDED:
            continue
        assert task.state is TaskState.FAILED, task
        assert task.error is not None, task
        assert task.error["type"] in ("DeadLettered", "AgentLost"), task.error
        if task.error["type"] == "DeadLettered":
            assert task.error["message"].startswith(
                "dead_lettered: delivery limit reached (x-death: reason=delivery_limit, "
                f"queue={names.pool_queue(pool_name)}"
            ), task.error
            assert histories[task_id][-1] == task.error["message"]


def test_a_drain_hands_back_without_spending_the_delivery_limit(
    plane: Plane, pool_name: str, tmp_path: Path
) -> None:
    """An agent that drains hands back the delivery it holds: with a delivery limit of 0 a
    requeue (nack) dead-letters the message at once; a ``returned`` report does not."""
    plane.client.create_pool(pool_name)
    release = tmp_path / "release"
    agent = plane.start_agent(pool_name, "--concurrency", "1", *ALLOW, name="drained")
    busy = plane.client.submit(pool_name, HOLD, args=[str(release)]).id
    wait_until(lambda: plane.client.get(busy).state is TaskState.RUNNING, 30, "the long task")
    waiting = plane.client.submit(pool_name, "tests.tasks:add", args=[1, 2]).id
    wait_holding_a_delivery(agent, "the agent to hold the second task's delivery")

    agent.signal(signal.SIGTERM)
    wait_until(
        lambda: any(r.startswith(("returned", "dead_lettered")) for r in reasons(plane, waiting)),
        30,
        "the draining agent to hand the waiting task back",
    )
    release.touch()
    assert agent.popen.wait(30) == 0, agent.output()
    plane.start_agent(pool_name, "--concurrency", "1", *ALLOW, name="next")
    done = settle(plane, [busy, waiting], 60)

    assert [t.state for t in done] == [TaskState.SUCCEEDED] * 2
    assert done[1].attempt == 1, "a hand-back spends no attempt"
    history = reasons(plane, waiting)
    assert not any(r.startswith("dead_lettered") for r in history), history
    assert "returned: draining" in history, history
    assert queue_depth(plane.settings.amqp_url, names.dead_queue(pool_name)) == 0


def test_a_task_an_agent_refuses_to_verify_ends_failed_with_the_agents_reason(
    plane: Plane, pool_name: str
) -> None:
    """An agent pinned to keys the plane no longer signs with (a rotation it missed) parks
    the task message in ``rexec.dead.<pool>`` with its reason: the task fails saying so."""
    plane.client.create_pool(pool_name)
    retired = Signer(generate_private_key()).public_key
    agent = plane.start_agent(
        pool_name, *ALLOW, name="pinned", env={"REXEC_SIGNING_PUBLIC_KEYS": retired}
    )
    task_id = plane.client.submit(pool_name, "tests.tasks:add", args=[1, 2]).id
    [task] = settle(plane, [task_id], 60)

    assert task.state is TaskState.FAILED and task.attempt == 1, task
    assert task.error is not None and task.error["type"] == "DeadLettered", task.error
    message = task.error["message"]
    assert message.startswith("dead_lettered by agent "), message
    assert "refused: bad signature" in message, message
    assert reasons(plane, task_id)[-1] == message
    assert agent.popen.poll() is None, "a refused message stops nothing"
