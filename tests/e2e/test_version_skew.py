"""Upgrades: an agent one minor version behind keeps working; an incompatible one is refused
with a message that says which side to upgrade."""

from __future__ import annotations

import anyio
import pytest
from sqlalchemy import select

from rexec.dispatcher.db.engine import make_engine, make_sessionmaker
from rexec.dispatcher.db.models import Agent
from rexec.schemas import messages
from rexec.schemas.api import SubmitTask, TaskState
from tests.e2e.conftest import Plane
from tests.support import Process, python_entry, wait_until

ALLOW = ["--allow", "tests.tasks:*"]


def agent_announcing(plane: Plane, pool: str, protocol: str) -> Process:
    token = plane.client.create_token(pool).secret
    env = {**plane.env, "REXEC_AGENT_TOKEN": token, "REXEC_TEST_PROTOCOL": protocol}
    process = Process(
        [*python_entry("tests.old_agent"), "--pool", pool, *ALLOW],
        env,
        plane.logs / f"agent-{protocol}.log",
    )
    plane.processes.append(process)
    return process


async def agent_rows(database_url: str, pool: str) -> list[Agent]:
    engine = make_engine(database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            return list(await session.scalars(select(Agent).where(Agent.pool == pool)))
    finally:
        await engine.dispose()


def test_an_agent_one_minor_version_behind_keeps_working(plane: Plane, pool_name: str) -> None:
    behind = f"{messages.PROTOCOL_VERSION}.{messages.PROTOCOL_MINOR - 1}"
    plane.client.create_pool(pool_name)
    agent_announcing(plane, pool_name, behind)
    wait_until(
        lambda: any(a.state == "online" for a in plane.client.list_agents(pool=pool_name)),
        30,
        "the older agent online",
    )
    # Submitted at once, so the relay would put them in batches: not for a 1.1 agent, which
    # refuses them (dead-letters them) as its strict decoder would.
    ids = plane.client.submit_many(
        [SubmitTask(pool=pool_name, target="tests.tasks:add", args=[i, 1]) for i in range(20)]
    )
    done = plane.client.wait(ids, timeout=60)
    assert [(d.state, d.result) for d in done] == [(TaskState.SUCCEEDED, i + 1) for i in range(20)]
    [row] = anyio.run(agent_rows, plane.settings.database_url, pool_name)
    assert row.protocol_minor == messages.PROTOCOL_MINOR - 1


@pytest.mark.parametrize(
    ("protocol", "upgrade"),
    [
        (f"{messages.PROTOCOL_VERSION + 1}.0", "upgrade the orchestration plane"),
        (f"{messages.PROTOCOL_VERSION - 1}.9", "upgrade the agent"),
    ],
)
def test_an_incompatible_agent_is_refused_and_told_what_to_upgrade(
    plane: Plane, pool_name: str, protocol: str, upgrade: str
) -> None:
    plane.client.create_pool(pool_name)
    agent = agent_announcing(plane, pool_name, protocol)
    wait_until(lambda: agent.popen.poll() is not None, 30, "the refused agent to exit")
    assert agent.popen.returncode == 1
    output = agent.output()
    assert f"agent speaks protocol {protocol}" in output
    assert upgrade in output
    assert anyio.run(agent_rows, plane.settings.database_url, pool_name) == []
