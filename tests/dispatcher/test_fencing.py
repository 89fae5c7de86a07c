"""Fencing by the claim: a ``started`` that arrives late, after another agent took the
lease over and started the attempt, must not take the task back (issue 20, item 1).

The fault is a stall between an agent's claim and its ``started`` (SIGSTOP, a long pause):
what reaches the dispatcher is the other agent's ``started``, then the stalled one's, then
the other's result. The events go through the events consumer's own code, on SQLite and on
PostgreSQL; the fences are what the agents' claim script returns (Redis' clock at the claim).
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from rexec.dispatcher.db.models import Task, TaskTransition
from rexec.dispatcher.events import apply_events
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages
from tests.dispatcher.test_relay_events import make_pool, make_task

pytestmark = pytest.mark.anyio

STALLED_CLAIM = 1_764_000_000_000_000
TAKEOVER_CLAIM = STALLED_CLAIM + 5_000_000  # five seconds later, past the stalled one's TTL


async def test_a_late_started_of_a_stalled_agent_does_not_take_the_task_back(
    rt: Runtime, pool_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    controls: list[tuple[str, messages.Control]] = []

    async def publish_control(agent_id: str, control: messages.Control) -> None:
        controls.append((agent_id, control))

    monkeypatch.setattr(rt, "publish_control", publish_control)
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, outbox=False)

    def event(
        kind: type[messages.TaskEvent], agent: str, fence: int, **fields: object
    ) -> messages.TaskEvent:
        return kind(
            task_id=task_id, attempt=1, agent_id=agent, at=time.time(), fence=fence, **fields
        )  # type: ignore[call-arg]

    await apply_events(rt, [event(messages.Started, "rescuer", TAKEOVER_CLAIM)])
    await apply_events(rt, [event(messages.Started, "stalled", STALLED_CLAIM)])
    # The stalled agent is told to stop its copy; its result, if any, is refused too.
    assert controls == [
        ("stalled", messages.Control(action="lease_lost", task_id=task_id, attempt=1))
    ]
    await apply_events(
        rt,
        [
            event(messages.Succeeded, "stalled", STALLED_CLAIM, result="the stalled copy"),
            event(messages.Succeeded, "rescuer", TAKEOVER_CLAIM, result="the rescuer's"),
        ],
    )
    async with rt.sessions() as session:
        task = await session.get(Task, task_id)
        assert task is not None
        assert (task.state, task.agent_id, task.result_json) == (
            "succeeded",
            "rescuer",
            '"the rescuer\'s"',
        )
        assert task.fence == TAKEOVER_CLAIM
        history = (
            await session.execute(
                select(TaskTransition.to_state, TaskTransition.agent_id)
                .where(TaskTransition.task_id == task_id)
                .order_by(TaskTransition.id)
            )
        ).all()
    assert [tuple(h) for h in history] == [("running", "rescuer"), ("succeeded", "rescuer")]
    assert rt.metrics.stale_events.labels("stale_claim")._value.get() == 2


async def test_a_takeover_by_a_later_claim_moves_the_task(rt: Runtime, pool_name: str) -> None:
    """The other order: the first agent started, then died; the rescuer's later claim wins."""
    await make_pool(rt, pool_name)
    task_id = await make_task(rt, pool_name, outbox=False)
    for agent, fence in (("first", STALLED_CLAIM), ("rescuer", TAKEOVER_CLAIM)):
        started = messages.Started(
            task_id=task_id, attempt=1, agent_id=agent, at=time.time(), fence=fence
        )
        await apply_events(rt, [started])
    async with rt.sessions() as session:
        task = await session.get(Task, task_id)
        assert task is not None
        assert (task.state, task.agent_id, task.fence) == ("running", "rescuer", TAKEOVER_CLAIM)
