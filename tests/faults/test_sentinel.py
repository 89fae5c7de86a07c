"""Redis behind Sentinel: the master is killed (kill -9) mid-run and a replica is promoted.

Both planes reach Redis through ``REXEC_REDIS_URL=redis+sentinel://…`` and must follow the
failover by themselves. The promoted replica may lack the newest heartbeat writes (replication
is asynchronous) and is another server (another ``run_id``): the watchdog must grant its grace
before judging anyone, so no live agent loses its tasks. Guide promises 1 and 3: every task
ends once, nothing lost, no requeue storm. Real ``rexec serve`` and ``rexec-agent`` processes;
the Sentinel group is a private one (``servers.py``).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
import redis

from rexec.schemas.api import TaskState
from rexec.schemas.names import RedisKeys
from rexec.schemas.settings import Settings, load_settings
from tests.e2e.conftest import Plane
from tests.faults.conftest import FAST
from tests.faults.servers import PrivateSentinel
from tests.faults.test_service_restarts import (
    assert_all_succeeded_once,
    executions,
    start_agents,
    submit_mix,
)
from tests.support import wait_until

HOLD = "tests.faults.tasks:hold"
GRACE_LOG = "judging no agent for one heartbeat TTL"


def grace_ends(dispatcher: str) -> float | None:
    """When (epoch seconds) the watchdog's last grace ends, from its log; None if none yet."""
    starts = [json.loads(line)["ts"] for line in dispatcher.splitlines() if GRACE_LOG in line]
    return starts[-1] if starts else None


def requeues(plane: Plane) -> float:
    text = httpx.get(f"{plane.settings.api_url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^rexec_requeues_total\{[^}]*\} (\S+)$", text, re.M))


def transitions_into(database_url: str, state: str) -> dict[str, int]:
    """Task id -> how many recorded transitions into ``state``, read from the database."""
    path = database_url.split(":///", 1)[1]
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT task_id, COUNT(*) FROM task_transitions WHERE to_state = ? GROUP BY task_id",
            (state,),
        ).fetchall()
    return {task_id: count for task_id, count in rows}


class TestSentinelFailover:
    @pytest.fixture
    def fault_settings(
        self, sqlite_url: str, amqp_url: str, redis_prefix: str, sentinel_group: PrivateSentinel
    ) -> Settings:
        return load_settings(
            {},
            database_url=sqlite_url,
            amqp_url=amqp_url,
            redis_url=sentinel_group.url,
            redis_prefix=f"{redis_prefix}-sentinel-{time.monotonic_ns()}",
            **FAST,
        )

    def test_the_master_killed_mid_run_fails_over_with_nothing_lost_and_nothing_requeued(
        self, plane: Plane, pool_name: str, tmp_path: Path, sentinel_group: PrivateSentinel
    ) -> None:
        start_agents(plane, pool_name, count=2, concurrency=10)
        runs = tmp_path / "runs"
        runs.mkdir()
        # Long tasks run until the watchdog, trusting heartbeats again after the failover,
        # has judged their agents on the keys they wrote to the promoted master.
        release = tmp_path / "release"
        long = [plane.client.submit(pool_name, HOLD, args=[str(release)]).id for _ in range(4)]
        tasks = {task_id: "released" for task_id in long}
        tasks |= submit_mix(plane, pool_name, runs, "before", 60)
        wait_until(
            lambda: all(plane.client.get(i).state is TaskState.RUNNING for i in long),
            20,
            "the long tasks to run",
        )
        wait_until(lambda: sum(executions(runs).values()) >= 10, 20, "the first tasks to finish")

        dispatcher = plane.processes[0]
        graces_before = dispatcher.output().count(GRACE_LOG)
        killed_at = time.monotonic()
        old_master = sentinel_group.kill_master()
        # Submitted while no master is known: accepted now, claimed once one is promoted.
        tasks |= submit_mix(plane, pool_name, runs, "during", 20)
        new_master = wait_until(
            lambda: (port := sentinel_group.master_port()) not in (None, old_master) and port,
            30,
            "the Sentinels to promote the replica",
        )
        print(f"failover took {time.monotonic() - killed_at:.1f}s")
        after = submit_mix(plane, pool_name, runs, "after", 20)
        tasks |= after

        ttl, interval = plane.settings.heartbeat_ttl, plane.settings.watchdog_interval
        wait_until(
            lambda: (
                dispatcher.output().count(GRACE_LOG) > graces_before
                and (end := grace_ends(dispatcher.output())) is not None
                and time.time() > end + ttl + 3 * interval
            ),
            30,
            "the watchdog's grace after the failover to end, and a few trusted ticks",
        )
        assert all(plane.client.get(i).state is TaskState.RUNNING for i in long), (
            "the long tasks outlived the grace"
        )
        release.touch()

        done = plane.client.wait(list(tasks), timeout=60)
        assert_all_succeeded_once(plane, tasks, done)
        requeued = [(t.id, t.attempt) for t in done if t.attempt != 1]
        assert not requeued, f"tasks requeued though their agent lived: {requeued}"

        # The database: one completion per task, no transition back to queued.
        succeeded = transitions_into(plane.settings.database_url, "succeeded")
        assert succeeded == dict.fromkeys(tasks, 1), "each completion is recorded exactly once"
        back = {
            t: n
            for t, n in transitions_into(plane.settings.database_url, "queued").items()
            if n > 1
        }
        assert not back, f"tasks queued again: {back}"
        assert requeues(plane) == 0
        agents = plane.client.list_agents(pool=pool_name)
        assert [a.state for a in agents] == ["online", "online"], agents
        ran = executions(runs)
        recorded = {name for task_id, name in tasks.items() if name and task_id not in long}
        assert set(ran) == recorded, f"never ran to the end: {sorted(recorded - set(ran))[:5]}"
        assert all(n == 1 for n in ran.values()), "nothing was redelivered, so nothing ran twice"

        log = dispatcher.output()
        assert "agent lost" not in log
        # Both agents heartbeat to the promoted master now.
        promoted = redis.Redis(port=new_master)
        try:
            keys = RedisKeys(plane.settings.redis_prefix)
            assert all(promoted.exists(keys.agent(a.id)) for a in agents)
        finally:
            promoted.close()
