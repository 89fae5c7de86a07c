"""Losing a RabbitMQ cluster node: both planes move to another node, nothing is lost.

Guide promise 1 (nothing lost, each task ends once) when the node that leads the pool's
quorum queue crashes mid-run. Real ``rexec serve`` and ``rexec-agent`` processes, given every
node in ``REXEC_AMQP_URL``, on a private three-node cluster (``servers.PrivateCluster``).
First (on the same cluster, before a node is lost), ``rexec.schemas.amqp.connect_cluster`` itself:
it passes over a node that is down, at the first connect and on a reconnect.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
from aio_pika import Message
from yarl import URL

from rexec.schemas import names
from rexec.schemas.amqp import BrokerUnreachable, connect_cluster
from rexec.schemas.api import TERMINAL_STATES, TaskState
from rexec.schemas.settings import Settings, load_settings
from tests.conftest import REDIS_URL
from tests.e2e.conftest import Plane
from tests.faults.conftest import FAST
from tests.faults.servers import GUEST, PrivateCluster, PrivateRabbit
from tests.faults.workload import (
    assert_all_succeeded_once,
    executions,
    start_agents,
    states,
    submit_mix,
)
from tests.support import await_until, free_port, wait_until


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_first_connect_passes_over_a_node_that_is_down(
    rabbit_cluster: PrivateCluster,
) -> None:
    amqp_url = rabbit_cluster.nodes[0].amqp_url
    down = f"amqp://guest:secret@127.0.0.1:{free_port()}/"
    connection = await connect_cluster(f"{down},{amqp_url}", connection_name="rexec-test")
    try:
        assert connection.url == URL(amqp_url)
    finally:
        await connection.close()
    with pytest.raises(BrokerUnreachable) as refused:
        await connect_cluster(f"{down},{down}", connection_name="rexec-test")
    assert str(refused.value).count("guest:***@127.0.0.1") == 2, refused.value
    assert "secret" not in str(refused.value)


@pytest.mark.anyio
async def test_a_lost_connection_moves_on_past_a_node_that_is_down(
    rabbit_cluster: PrivateCluster,
) -> None:
    """Its node drops the connection; the next node is down; the one after takes it, and the
    channel and its queue come back with it."""
    node = rabbit_cluster.nodes[0]
    amqp_url = node.amqp_url
    name = f"rexec-test-{uuid.uuid4().hex[:8]}"
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    connection = await connect_cluster(
        f"{amqp_url},{down},{amqp_url}", connection_name=name, reconnect_interval=0.1
    )
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        reconnected = anyio.Event()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set())
        async with httpx.AsyncClient(base_url=node.management_api, auth=GUEST) as api:
            found = await await_until(lambda: named_connection(api, name), 10, name)
            await api.delete(f"/api/connections/{quote(found, safe='')}")
        with anyio.fail_after(15):
            await reconnected.wait()
        assert connection.url == connection.nodes[2], "went on past the node that is down"
        await channel.default_exchange.publish(Message(b"back"), routing_key=queue.name)
        message = await await_until(lambda: queue.get(fail=False), 10, "the message")
        assert message.body == b"back"
    finally:
        await connection.close()


async def named_connection(api: httpx.AsyncClient, name: str) -> str:
    response = await api.get("/api/connections")
    for connection in response.json():
        if connection.get("client_properties", {}).get("connection_name") == name:
            return str(connection["name"])
    return ""


def queue(node: PrivateRabbit, name: str) -> dict[str, Any]:
    """The queue as the management API of ``node`` sees it ({} while unknown)."""
    try:
        response = httpx.get(
            f"{node.management_api}/api/queues/%2F/{quote(name, safe='')}", auth=GUEST, timeout=5
        )
    except httpx.HTTPError:
        return {}
    return dict(response.json()) if response.status_code == 200 else {}


def rexec_connections(node: PrivateRabbit) -> dict[str, str]:
    """rexec's connections in the cluster: connection name -> the node it is on."""
    try:
        response = httpx.get(f"{node.management_api}/api/connections", auth=GUEST, timeout=5)
        response.raise_for_status()
    except httpx.HTTPError:
        return {}
    found: dict[str, str] = {}
    for connection in response.json():
        name = connection.get("client_properties", {}).get("connection_name", "")
        if name.startswith("rexec-"):
            found[name] = connection["node"]
    return found


def replicated_on(node: PrivateRabbit, name: str, members: set[str]) -> dict[str, Any]:
    """The queue once its leader and its online members are exactly among ``members``."""
    info = queue(node, name)
    online = set(info.get("online", []))
    if info.get("leader") in members and members <= online:
        return info
    return {}


@pytest.mark.timeout(300)  # includes booting the session's cluster (deadline 120 s)
class TestClusterNodeLoss:
    @pytest.fixture
    def fault_settings(
        self, sqlite_url: str, redis_prefix: str, rabbit_cluster: PrivateCluster
    ) -> Settings:
        return load_settings(
            {},
            database_url=sqlite_url,
            amqp_url=rabbit_cluster.amqp_url,
            # Single by design; only the watchdog uses it, to close a dead agent's connection.
            management_url=rabbit_cluster.nodes[-1].management_url,
            redis_url=REDIS_URL,
            redis_prefix=f"{redis_prefix}-cluster-{time.monotonic_ns()}",
            **FAST,
        )

    def test_losing_the_node_that_leads_the_pool_queue_loses_nothing(
        self,
        plane: Plane,
        pool_name: str,
        tmp_path: Path,
        rabbit_cluster: PrivateCluster,
        sqlite_url: str,
    ) -> None:
        cluster = rabbit_cluster
        everyone = cluster.names
        start_agents(plane, pool_name, count=2, concurrency=8)
        pool_queue = names.pool_queue(pool_name)
        watcher = cluster.nodes[-1]
        for name in (pool_queue, names.EVENTS_QUEUE):
            info = wait_until(
                lambda name=name: replicated_on(watcher, name, everyone), 20, f"{name} on 3 nodes"
            )
            assert set(info["members"]) == everyone, f"{name} is not on every node: {info}"
        leader = queue(watcher, pool_queue)["leader"]
        connected = wait_until(
            lambda: now if len(now := rexec_connections(watcher)) >= 3 else {},
            10,
            "the dispatcher's and both agents' connections",
        )
        assert leader in connected.values(), f"no rexec client on the leader {leader}: {connected}"

        runs = tmp_path / "runs"
        runs.mkdir()
        tasks = submit_mix(plane, pool_name, runs, "before", 120)
        wait_until(lambda: sum(executions(runs).values()) >= 15, 30, "the first tasks to finish")
        mid = states(plane, pool_name)
        assert mid[TaskState.QUEUED] > 0 and mid[TaskState.RUNNING] > 0, mid

        killed = cluster.by_name(leader)
        killed.kill()
        survivors = everyone - {leader}
        watcher = next(n for n in cluster.nodes if n.node in survivors)
        lost_at = time.monotonic()
        # Submitted while the planes reconnect: accepted, published once they are back.
        tasks |= submit_mix(plane, pool_name, runs, "during", 10)
        for name in (pool_queue, names.EVENTS_QUEUE):
            wait_until(
                lambda name=name: replicated_on(watcher, name, survivors),
                30,
                f"{name} to be led by a surviving node",
            )
        # Every rexec client moved to a surviving node.
        wait_until(
            lambda: len(now := rexec_connections(watcher)) >= 3 and set(now.values()) <= survivors,
            30,
            "the dispatcher and both agents to reconnect to surviving nodes",
        )
        after = submit_mix(plane, pool_name, runs, "after", 20)
        tasks |= after

        done = plane.client.wait(list(tasks), timeout=60)
        recovered = time.monotonic() - lost_at
        assert_all_succeeded_once(plane, tasks, done)
        ran = executions(runs)
        recorded = {name for name in tasks.values() if name}
        assert set(ran) == recorded, f"never ran to the end: {sorted(recorded - set(ran))[:5]}"

        # On the database: one transition into succeeded per task, and nothing else terminal.
        terminal = sorted(state.value for state in TERMINAL_STATES)
        with sqlite3.connect(sqlite_url.split(":///", 1)[1]) as db:
            rows = db.execute(
                "SELECT task_id, to_state, count(*) FROM task_transitions"
                f" WHERE to_state IN ({', '.join('?' * len(terminal))})"
                " GROUP BY task_id, to_state",
                terminal,
            ).fetchall()
        assert {(task, state, n) for task, state, n in rows} == {
            (task, "succeeded", 1) for task in tasks
        }
        print(
            f"node {leader} lost; all {len(tasks)} tasks done {recovered:.1f}s later; "
            f"record tasks run more than once: {sum(n > 1 for n in ran.values())}"
        )
