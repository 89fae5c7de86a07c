"""A graceful drain keeps its last success (issue 20, item 5).

An agent stopped with SIGTERM finishes its running tasks, reports them, goes offline and
exits. When the dispatcher is behind on events, its last success may not be applied yet once
the agent is gone: here the events consumer is held on an earlier event (another task's row is
locked in PostgreSQL by another writer, as a long transaction does), so the success waits in
the queue behind it. The watchdog, which reads without locks, must not take the agent's exit
for a death and run that task again: the agent leaves its heartbeat key behind, marked
stopped, and the dispatcher removes it only once it applied the agent's ``offline`` event,
which comes after every other event of the agent.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import make_url

from rexec.schemas.api import TaskState
from rexec.schemas.settings import Settings
from tests.conftest import POSTGRES_DSN
from tests.e2e.conftest import Plane
from tests.faults.conftest import with_settings
from tests.faults.workload import SLEEP, start_agents
from tests.support import wait_until


@pytest.fixture
def plane(fault_settings: Settings, postgres_url: str, tmp_path: Path) -> Plane:
    plane = Plane(with_settings(fault_settings, database_url=postgres_url), tmp_path)
    yield plane  # type: ignore[misc]
    plane.close()


class RowLock:
    """``SELECT ... FOR UPDATE`` of one task's row in a psql session of its own, held until
    :meth:`release`."""

    def __init__(self, database_url: str, task_id: str) -> None:
        database = make_url(database_url).database
        self.psql = subprocess.Popen(
            ["psql", f"{POSTGRES_DSN}/{database}", "-q", "-v", "ON_ERROR_STOP=1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.psql.stdin is not None and self.psql.stdout is not None
        self.psql.stdin.write(
            f"BEGIN; SELECT 'locked' FROM tasks WHERE id = '{task_id}' FOR UPDATE;\n"
        )
        self.psql.stdin.flush()
        line = self.psql.stdout.readline()  # the header, then the row: it is ours now
        while "locked" not in line:
            assert line, "psql ended before the row was locked"
            line = self.psql.stdout.readline()

    def release(self) -> None:
        assert self.psql.stdin is not None
        self.psql.stdin.write("ROLLBACK;\n")
        self.psql.stdin.close()
        self.psql.wait(timeout=30)


def test_the_last_success_of_a_drained_agent_survives_a_lagging_dispatcher(
    plane: Plane, pool_name: str
) -> None:
    ttl = plane.settings.heartbeat_ttl
    start_agents(plane, pool_name, count=1, concurrency=2)
    agent = plane.processes[-1]
    earlier = plane.client.submit(pool_name, SLEEP, args=[0.5])
    last = plane.client.submit(pool_name, SLEEP, args=[3.0])
    wait_until(
        lambda: all(plane.client.get(t.id).state is TaskState.RUNNING for t in (earlier, last)),
        20,
        "both tasks to run",
    )
    lock = RowLock(plane.settings.database_url, earlier.id)
    try:
        agent.signal(signal.SIGTERM)  # drain: both tasks run to their end first
        wait_until(lambda: agent.popen.poll() is not None, 30, "the agent to drain and exit")
        exited = time.monotonic()
        assert plane.client.get(last.id).state is TaskState.RUNNING  # its success waits
        # Long enough for a heartbeat key to expire and the watchdog to look many times.
        wait_until(lambda: time.monotonic() - exited > ttl * 3, ttl * 3 + 10, "the lag")
    finally:
        lock.release()
    done = plane.client.wait([earlier.id, last.id], timeout=30)
    assert [(t.state, t.attempt) for t in done] == [(TaskState.SUCCEEDED, 1)] * 2, plane.dump_logs()
    assert "agent lost" not in plane.processes[0].output()
    wait_until(
        lambda: [a.state for a in plane.client.list_agents(pool=pool_name)] == ["offline"],
        10,
        "the agent shown offline",
    )
