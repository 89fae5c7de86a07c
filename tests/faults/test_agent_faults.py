"""Agent faults: kill -9, hang (SIGSTOP), poison tasks, SIGTERM drain, long tasks.

Each test runs real ``rexec serve`` and ``rexec-agent`` processes, injects a real fault, and
asserts on the database that every task reached exactly one terminal state.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx

from rexec.schemas.api import TaskState
from tests.conftest import ADMIN_HEADERS
from tests.e2e.conftest import Plane
from tests.faults.conftest import ALLOW, assert_each_terminal_once
from tests.support import Process, wait_until


def online(plane: Plane, pool: str, count: int) -> None:
    wait_until(
        lambda: sum(a.state == "online" for a in plane.client.list_agents(pool=pool)) >= count,
        20,
        f"{count} agent(s) online in {pool}",
    )


def running_on(plane: Plane, ids: list[str]) -> set[str]:
    """Wait until every task runs; return the agents running them."""
    wait_until(
        lambda: all(plane.client.get(i).state is TaskState.RUNNING for i in ids),
        20,
        "tasks to start",
    )
    return {plane.client.get(i).agent_id or "" for i in ids}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stale_events(plane: Plane) -> float:
    # /metrics needs a viewer key: the bootstrap admin key will do.
    response = httpx.get(f"{plane.settings.api_url}/metrics", headers=ADMIN_HEADERS, timeout=10)
    response.raise_for_status()
    text = response.text
    found = re.search(r'^rexec_stale_events_total\{reason="stale_attempt"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def failover_bound(plane: Plane, work: float) -> float:
    """Detection (TTL + one watchdog interval) and restart, with room for a loaded CI machine.

    Far below the minutes a broker heartbeat takes, which is what this replaces; the precise
    figures are measured by ``bench/failover.py``, not asserted here.
    """
    s = plane.settings
    return s.heartbeat_ttl + s.watchdog_interval + work + 10.0


def start_victim(plane: Plane, pool: str, concurrency: int = 4) -> Process:
    plane.client.create_pool(pool)
    victim = plane.start_agent(pool, "--concurrency", str(concurrency), *ALLOW, name="victim")
    online(plane, pool, 1)
    return victim


def test_kill_9_an_agent_with_tasks_running(plane: Plane, pool_name: str, tmp_path: Path) -> None:
    victim = start_victim(plane, pool_name)
    runs = tmp_path / "runs"
    runs.mkdir()
    # Each first execution runs a minute, so however slowly the survivor starts, the kill
    # lands while all four run on the victim; the retries take 1.5 s.
    ids = [
        plane.client.submit(
            pool_name,
            "tests.faults.tasks:record_after_a_long_first",
            args=[str(runs), f"t{i}", 1.5],
        ).id
        for i in range(4)
    ]
    [victim_id] = running_on(plane, ids)
    plane.start_agent(pool_name, "--concurrency", "4", *ALLOW, name="survivor")
    online(plane, pool_name, 2)
    still = [plane.client.get(i) for i in ids]
    assert all(t.state is TaskState.RUNNING and t.agent_id == victim_id for t in still), (
        f"precondition: all four still run on the victim before the kill, not {still}"
    )

    killed = time.monotonic()
    victim.signal(signal.SIGKILL)
    done = plane.client.wait(ids, timeout=60)
    elapsed = time.monotonic() - killed

    assert [t.state for t in done] == [TaskState.SUCCEEDED] * 4
    assert all(t.attempt == 2 and t.agent_id != victim_id for t in done)
    assert_each_terminal_once(plane, done)
    finished = sorted(p.name.split(".")[0] for p in runs.iterdir() if p.suffix != ".first")
    assert finished == ["t0", "t1", "t2", "t3"], "each ran to the end once"
    assert elapsed < failover_bound(plane, 1.5), f"failover took {elapsed:.1f}s"


def test_a_hung_agent_is_replaced_and_its_stale_attempts_are_stopped(
    plane: Plane, pool_name: str, tmp_path: Path
) -> None:
    victim = start_victim(plane, pool_name, concurrency=2)
    markers = [tmp_path / f"first-attempt-{i}" for i in range(2)]
    ids = [
        plane.client.submit(pool_name, "tests.faults.tasks:slow_once", args=[str(m), 120]).id
        for m in markers
    ]
    running_on(plane, ids)
    plane.start_agent(pool_name, "--concurrency", "2", *ALLOW, name="survivor")
    online(plane, pool_name, 2)

    stopped = time.monotonic()
    victim.signal(signal.SIGSTOP)
    try:
        done = plane.client.wait(ids, timeout=60)
        elapsed = time.monotonic() - stopped
    finally:
        victim.signal(signal.SIGCONT)
    assert [(t.state, t.result, t.attempt) for t in done] == [(TaskState.SUCCEEDED, 2, 2)] * 2
    assert elapsed < failover_bound(plane, 0.0), f"failover took {elapsed:.1f}s"

    # Woken up, the victim learns its leases were taken over and kills the first attempts.
    first_attempts = [int(m.read_text()) for m in markers]
    wait_until(
        lambda: not any(alive(pid) for pid in first_attempts), 20, "the stale attempts to be killed"
    )
    wait_until(
        lambda: victim.output().count("was taken over") >= 2, 10, "the victim to log the takeover"
    )
    assert_each_terminal_once(plane, [plane.client.get(i) for i in ids])


def test_late_results_of_a_hung_agent_are_rejected_and_counted(
    plane: Plane, pool_name: str, tmp_path: Path
) -> None:
    victim = start_victim(plane, pool_name, concurrency=3)
    release = tmp_path / "release"  # the tasks run until it exists: as long as the test needs
    ids = [
        plane.client.submit(pool_name, "tests.faults.tasks:hold", args=[str(release)]).id
        for _ in range(3)
    ]
    running_on(plane, ids)
    plane.start_agent(pool_name, "--concurrency", "3", *ALLOW, name="survivor")
    online(plane, pool_name, 2)
    before = stale_events(plane)

    victim.signal(signal.SIGSTOP)
    release.touch()  # its children finish while it is stopped; their results wait in pipes
    try:
        done = plane.client.wait(ids, timeout=60)
    finally:
        victim.signal(signal.SIGCONT)
    assert all(t.state is TaskState.SUCCEEDED and t.attempt == 2 for t in done)

    # Each late attempt is either reported (and rejected by fencing) or stopped by the agent.
    def settled() -> bool:
        rejected = stale_events(plane) - before
        stopped = victim.output().count("was taken over")
        return rejected + stopped >= 3

    wait_until(settled, 20, "the victim's late attempts to be rejected or stopped")
    after = [plane.client.get(i) for i in ids]
    assert [(t.state, t.attempt, t.agent_id) for t in after] == [
        (t.state, t.attempt, t.agent_id) for t in done
    ]
    assert_each_terminal_once(plane, after)


def test_a_poison_task_that_kills_its_agent_fails_after_its_attempts(
    plane: Plane, pool_name: str
) -> None:
    plane.client.create_pool(pool_name)
    agents = [
        plane.start_agent(pool_name, "--concurrency", "2", *ALLOW, name=f"agent{i}")
        for i in range(2)
    ]
    online(plane, pool_name, 2)
    poison = plane.client.submit(pool_name, "tests.faults.tasks:kill_agent", max_attempts=2)

    def restart_dead_agents_until_done() -> bool:
        for index, agent in enumerate(agents):
            if agent.popen.poll() is not None:  # a supervisor (Kubernetes) would restart it
                agents[index] = plane.start_agent(
                    pool_name, "--concurrency", "2", *ALLOW, name=f"agent{index}"
                )
        return plane.client.get(poison.id).state.terminal

    wait_until(restart_dead_agents_until_done, 60, "the poison task to give up")
    final = plane.client.get(poison.id)
    assert (final.state, final.attempt) == (TaskState.FAILED, 2)
    assert final.error is not None and final.error["type"] == "AgentLost"
    online(plane, pool_name, 1)
    healthy = plane.client.submit(pool_name, "tests.tasks:add", args=[1, 1])
    assert plane.client.wait([healthy.id], timeout=30)[0].state is TaskState.SUCCEEDED
    assert_each_terminal_once(plane, [final])


def test_sigterm_drains_finishes_short_tasks_and_hands_back_long_ones(
    plane: Plane, pool_name: str, tmp_path: Path
) -> None:
    plane.client.create_pool(pool_name)
    victim = plane.start_agent(
        pool_name, "--concurrency", "4", "--drain-timeout", "3", *ALLOW, name="victim"
    )
    online(plane, pool_name, 1)
    short = [plane.client.submit(pool_name, "tests.tasks:sleep", args=[1.0]).id for _ in range(2)]
    # One attempt only: a drain (a rolling restart) hands an attempt back without spending
    # it, so even these run again elsewhere (issue 20, item 9).
    long = [
        plane.client.submit(
            pool_name,
            "tests.faults.tasks:slow_once",
            args=[str(tmp_path / f"m{i}"), 120],
            max_attempts=1,
        ).id
        for i in range(2)
    ]
    running_on(plane, short + long)
    plane.start_agent(pool_name, "--concurrency", "4", *ALLOW, name="survivor")
    online(plane, pool_name, 2)

    terminated = time.monotonic()
    victim.signal(signal.SIGTERM)
    done = {t.id: t for t in plane.client.wait(short + long, timeout=60)}
    elapsed = time.monotonic() - terminated
    assert victim.popen.wait(30) == 0, victim.output()[-2000:]

    assert all((done[i].state, done[i].attempt) == (TaskState.SUCCEEDED, 1) for i in short), (
        "short tasks finished there"
    )
    assert all(
        (done[i].state, done[i].result, done[i].attempt) == (TaskState.SUCCEEDED, 2, 2)
        for i in long
    )
    # Handed back by the agent itself (AgentShutdown), not found dead by the watchdog.
    for task_id in long:
        reasons = [h.reason for h in plane.client.history(task_id) if h.to_state == "queued"]
        assert reasons[-1] == "AgentShutdown", reasons
    assert elapsed < 3 + 10.0, f"hand-back took {elapsed:.1f}s"
    assert_each_terminal_once(plane, list(done.values()))
    # Offline once the dispatcher applied its offline event (and deleted its stopped key).
    wait_until(
        lambda: (
            [
                a.state
                for a in plane.client.list_agents(pool=pool_name)
                if a.id == done[short[0]].agent_id
            ]
            == ["offline"]
        ),
        10,
        "the victim shown offline",
    )


def test_a_long_task_does_not_hold_its_delivery(
    plane: Plane, pool_name: str, tmp_path: Path
) -> None:
    """RabbitMQ's consumer_timeout closes the channel of a consumer holding a delivery unacked
    too long, and the delivery goes back to the queue. An agent acks once the task started, so
    closing its connection mid-run (what the timeout would do) neither restarts nor loses it."""
    plane.client.create_pool(pool_name)
    runs = tmp_path / "runs"
    runs.mkdir()
    first = plane.start_agent(pool_name, "--concurrency", "1", *ALLOW, name="first")
    online(plane, pool_name, 1)
    task = plane.client.submit(
        pool_name, "tests.faults.tasks:record", args=[str(runs), "long", 8.0]
    )
    [holder] = running_on(plane, [task.id])
    plane.start_agent(pool_name, "--concurrency", "1", *ALLOW, name="second")
    online(plane, pool_name, 2)

    closed = wait_until(
        lambda: close_connections_of(plane, holder), 15, "the agent's connection to close"
    )
    assert closed >= 1
    [done] = plane.client.wait([task.id], timeout=60)
    assert (done.state, done.attempt, done.agent_id) == (TaskState.SUCCEEDED, 1, holder)
    assert len(list(runs.iterdir())) == 1, "the task ran once: its delivery was not redelivered"
    assert first.popen.poll() is None, "the agent survived losing its connection"


def close_connections_of(plane: Plane, agent_id: str) -> int:
    import anyio

    from rexec.dispatcher.management import close_agent_connections

    pool = next(a.pool for a in plane.client.list_agents() if a.id == agent_id)
    return anyio.run(
        close_agent_connections, plane.settings, pool, agent_id, "test: as consumer_timeout would"
    )


def test_tasks_delivered_to_an_idle_hung_agent_run_elsewhere_within_the_ttl(
    plane: Plane, pool_name: str
) -> None:
    """Issue 20, item 9: an agent hung while idle (SIGSTOP of it and its children) runs no
    task, so the watchdog never looked at it; the broker kept delivering into its open
    prefetch window, and those deliveries waited for the AMQP heartbeat (a minute or more).
    Its heartbeat key expires like any other: it is cut off, and they go to the other agent."""
    victim = start_victim(plane, pool_name)
    plane.start_agent(pool_name, "--concurrency", "4", *ALLOW, name="survivor")
    online(plane, pool_name, 2)
    os.killpg(victim.pid, signal.SIGSTOP)
    try:
        hung = time.monotonic()
        ids = [plane.client.submit(pool_name, "tests.tasks:add", args=[i, 1]).id for i in range(8)]
        done = plane.client.wait(ids, timeout=failover_bound(plane, 0.0) + 20)
        elapsed = time.monotonic() - hung
        lost = [a.pid for a in plane.client.list_agents(pool=pool_name) if a.state == "lost"]
    finally:
        os.killpg(victim.pid, signal.SIGCONT)
    assert [t.state for t in done] == [TaskState.SUCCEEDED] * 8, [t.state for t in done]
    assert elapsed < failover_bound(plane, 0.0), f"took {elapsed:.1f}s"
    assert lost == [victim.pid]
