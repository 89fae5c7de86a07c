"""Service faults: a RabbitMQ restart, a Redis restart that loses every key, and a PostgreSQL
restart, mid-run.

Guide promise 1 (nothing lost, each task ends once) under the two service restarts, and
promise 3's corollary: a Redis outage is not "all agents dead", so nothing is requeued while
its agent lives. A database restart or outage stops no loop of ``rexec serve`` (promise 5),
and submits it cannot store are refused with a 503 that says so. Real ``rexec serve`` and ``rexec-agent`` processes; the restarted servers are
private ones (``servers.py``), never the shared services.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import make_url

from rexec.schemas.api import TaskState
from rexec.schemas.settings import Settings, load_settings
from tests.conftest import REDIS_URL
from tests.e2e.conftest import Plane
from tests.faults.conftest import FAST, assert_each_terminal_once
from tests.faults.servers import PrivatePostgres, PrivateRabbit, PrivateRedis
from tests.faults.workload import (
    SLEEP,
    SteadySubmitter,
    assert_all_succeeded_once,
    executions,
    start_agents,
    states,
    submit_mix,
)
from tests.proxy import TcpProxy
from tests.support import wait_until


class TestRabbitMQRestart:
    @pytest.fixture
    def fault_settings(
        self, sqlite_url: str, redis_prefix: str, private_rabbit: PrivateRabbit
    ) -> Settings:
        return load_settings(
            {},
            database_url=sqlite_url,
            amqp_url=private_rabbit.amqp_url,
            management_url=private_rabbit.management_url,
            redis_url=REDIS_URL,
            redis_prefix=f"{redis_prefix}-rabbit-{time.monotonic_ns()}",
            **FAST,
        )

    def test_a_broker_restart_mid_run_loses_nothing_and_completes_each_task_once(
        self, plane: Plane, pool_name: str, tmp_path: Path, private_rabbit: PrivateRabbit
    ) -> None:
        start_agents(plane, pool_name, count=2, concurrency=8)
        runs = tmp_path / "runs"
        runs.mkdir()
        tasks = submit_mix(plane, pool_name, runs, "before", 200)

        # Restart while some tasks are done, some running and most still queued.
        wait_until(lambda: sum(executions(runs).values()) >= 25, 30, "the first tasks to finish")
        mid = states(plane, pool_name)
        assert mid[TaskState.QUEUED] > 50 and mid[TaskState.RUNNING] > 0, mid
        private_rabbit.stop()
        try:
            # Submitted while the broker is down: accepted, published once it is back.
            tasks |= submit_mix(plane, pool_name, runs, "during", 10)
        finally:
            private_rabbit.start()
        # Submitted after the restart: both planes reconnected.
        after = submit_mix(plane, pool_name, runs, "after", 20)
        tasks |= after

        done_after = plane.client.wait(list(after), timeout=60)
        assert [t.state for t in done_after] == [TaskState.SUCCEEDED] * len(after)
        done = plane.client.wait(list(tasks), timeout=60)
        assert_all_succeeded_once(plane, tasks, done)
        ran = executions(runs)
        recorded = {name for name in tasks.values() if name}
        assert set(ran) == recorded, f"never ran to the end: {sorted(recorded - set(ran))[:5]}"
        # Executions may repeat (at-least-once); log it to see how often a restart causes it.
        print(f"record tasks run more than once: {sum(n > 1 for n in ran.values())}")


class TestRedisRestart:
    @pytest.fixture
    def fault_settings(
        self, sqlite_url: str, amqp_url: str, redis_prefix: str, private_redis: PrivateRedis
    ) -> Settings:
        return load_settings(
            {},
            database_url=sqlite_url,
            amqp_url=amqp_url,
            redis_url=private_redis.url,
            redis_prefix=redis_prefix,
            **FAST,
        )

    def test_a_redis_restart_that_loses_every_key_requeues_nothing(
        self, plane: Plane, pool_name: str, private_redis: PrivateRedis
    ) -> None:
        def restart(during: Callable[[], None]) -> None:
            private_redis.restart()
            during()

        ttl = plane.settings.heartbeat_ttl
        run_through_a_redis_fault(plane, pool_name, work=ttl * 2.5, fault=restart)

    def test_redis_down_longer_than_the_heartbeat_ttl_causes_no_requeue_storm(
        self, plane: Plane, pool_name: str, private_redis: PrivateRedis
    ) -> None:
        ttl = plane.settings.heartbeat_ttl
        down_for = ttl * 1.5

        def stop_for_a_while(during: Callable[[], None]) -> None:
            private_redis.stop()
            stopped = time.monotonic()
            try:
                during()
                wait_until(
                    lambda: (
                        "watchdog paused" in plane.processes[0].output()
                        and all("Redis unreachable" in a.output() for a in plane.processes[1:])
                        and time.monotonic() - stopped >= down_for
                    ),
                    down_for + 10,
                    "the dispatcher and the agents to notice Redis is gone, and the outage to last",
                )
            finally:
                private_redis.start()

        run_through_a_redis_fault(plane, pool_name, work=ttl * 3.5, fault=stop_for_a_while)

    def test_redis_frozen_longer_than_the_heartbeat_ttl_causes_no_requeue_storm(
        self, plane: Plane, pool_name: str, private_redis: PrivateRedis
    ) -> None:
        """SIGSTOP of Redis (issue 20, item 4): no call fails, every heartbeat key expires
        during the stall, and agents write theirs again a moment after it ends."""
        ttl = plane.settings.heartbeat_ttl

        def freeze(during: Callable[[], None]) -> None:
            private_redis.freeze()
            try:
                lasts(ttl * 3, during)
            finally:
                private_redis.thaw()

        run_through_a_redis_fault(plane, pool_name, work=ttl * 6, fault=freeze)


class TestRedisPartition:
    """Redis behind a proxy that drops every packet for a while (issue 20, item 4): no error,
    no refusal, only answers that never come, also after the partition heals."""

    @pytest.fixture
    def redis_proxy(self, private_redis: PrivateRedis) -> Iterator[TcpProxy]:
        proxy = TcpProxy(private_redis.port)
        yield proxy
        proxy.close()

    @pytest.fixture
    def fault_settings(
        self, sqlite_url: str, amqp_url: str, redis_prefix: str, redis_proxy: TcpProxy
    ) -> Settings:
        return load_settings(
            {},
            database_url=sqlite_url,
            amqp_url=amqp_url,
            redis_url=f"redis://127.0.0.1:{redis_proxy.port}/0",
            redis_prefix=redis_prefix,
            **FAST,
        )

    def test_a_partition_longer_than_the_heartbeat_ttl_wedges_nothing_and_requeues_nothing(
        self, plane: Plane, pool_name: str, redis_proxy: TcpProxy
    ) -> None:
        ttl = plane.settings.heartbeat_ttl

        def partition(during: Callable[[], None]) -> None:
            redis_proxy.partition()
            try:
                lasts(ttl * 3, during)
            finally:
                redis_proxy.heal()
            assert redis_proxy.dropped_bytes > 0

        run_through_a_redis_fault(plane, pool_name, work=ttl * 8, fault=partition)


def lasts(seconds: float, during: Callable[[], None]) -> None:
    """Run ``during``, then let the fault last ``seconds`` in all."""
    began = time.monotonic()
    during()
    wait_until(lambda: time.monotonic() - began >= seconds, seconds + 10, "the fault to last")


def run_through_a_redis_fault(
    plane: Plane, pool: str, *, work: float, fault: Callable[[Callable[[], None]], None]
) -> None:
    """Tasks run on two agents through a Redis fault: ``fault(during)`` makes it, calls
    ``during`` while it lasts (two more tasks are submitted, to be claimed once Redis is back),
    and ends it.

    Six long tasks outlive the fault and the grace after it, so the watchdog judges their
    agents on the keys they wrote again; two short ones end around the fault (their leases
    cannot be released yet).
    """
    # Each agent has a slot for every task, however the broker spreads them.
    start_agents(plane, pool, count=2, concurrency=10)
    ids = [plane.client.submit(pool, SLEEP, args=[work]).id for _ in range(6)]
    ids += [plane.client.submit(pool, SLEEP, args=[1.0]).id for _ in range(2)]
    wait_until(
        lambda: all(plane.client.get(i).state is TaskState.RUNNING for i in ids[:6]),
        20,
        "the long tasks to run",
    )
    dispatcher = plane.processes[0]
    fault(lambda: ids.extend(plane.client.submit(pool, SLEEP, args=[1.0]).id for _ in range(2)))
    done = plane.client.wait(ids, timeout=work + 30)
    assert [(t.state, t.attempt) for t in done] == [(TaskState.SUCCEEDED, 1)] * len(ids), (
        "no task was requeued while its agent lived"
    )
    assert_each_terminal_once(plane, done)
    lost = [a.id for a in plane.client.list_agents(pool=pool) if a.state == "lost"]
    assert not lost, f"agents judged lost though alive: {lost}"
    assert "agent lost" not in dispatcher.output()


class TestPostgresRestart:
    @pytest.fixture
    def fault_settings(
        self, private_postgres_url: str, amqp_url: str, redis_prefix: str
    ) -> Settings:
        return load_settings(
            {},
            database_url=private_postgres_url,
            amqp_url=amqp_url,
            redis_url=REDIS_URL,
            redis_prefix=f"{redis_prefix}-pg-{time.monotonic_ns()}",
            **FAST,
        )

    def test_a_database_restart_under_steady_submits_stops_nothing_and_loses_nothing(
        self, plane: Plane, pool_name: str, tmp_path: Path, private_postgres: PrivatePostgres
    ) -> None:
        """Under a steady submit load: a fast restart (every connection terminated
        mid-transaction, the server back at once), an outage that lasts until submits are
        refused, and a spell of the database refusing connections (as during a failover).
        ``rexec serve`` keeps running, every accepted task succeeds once, and every refused
        submit was a 503 that names the database.

        Before the fix, the fast restart alone ended ``rexec serve``: the events consumer's
        ``DBAPIError`` (connection closed in the middle of an operation) escaped its loop."""
        start_agents(plane, pool_name, count=2, concurrency=4)
        runs = tmp_path / "runs"
        runs.mkdir()
        dispatcher = plane.processes[0]

        def serving_and(more: Callable[[], bool]) -> Callable[[], bool]:
            return lambda: dispatcher.popen.poll() is not None or more()

        def relay_resumed() -> bool:
            out = dispatcher.output()
            return out.count("the relay works again") >= out.count("the relay waits")

        with SteadySubmitter(plane, pool_name, runs) as load:
            wait_until(lambda: len(executions(runs)) >= 10, 60, "the steady load to run")
            private_postgres.restart()
            after = len(load.accepted)
            wait_until(
                serving_and(lambda: load.accepted_more(after + 10)), 60, "submits after a restart"
            )
            assert dispatcher.popen.poll() is None, "rexec serve exited on a database restart"

            private_postgres.stop()
            try:
                refused = len(load.refusals)
                wait_until(
                    serving_and(lambda: len(load.refusals) >= refused + 3),
                    60,
                    "submits refused while the database is down",
                )
            finally:
                private_postgres.start()
            after = len(load.accepted)
            wait_until(
                serving_and(lambda: load.accepted_more(after + 10) and relay_resumed()),
                60,
                "submits accepted and the relay publishing after an outage",
            )

            # A failover's other face: the server answers, but refuses the database.
            database = make_url(plane.settings.database_url).database or ""
            relay_waits = dispatcher.output().count("the relay waits")
            private_postgres.refuse_connections(database)
            try:
                refused = len(load.refusals)
                wait_until(
                    serving_and(
                        lambda: (
                            len(load.refusals) >= refused + 3
                            and dispatcher.output().count("the relay waits") > relay_waits
                        )
                    ),
                    60,
                    "submits refused and the relay waiting while the database refuses",
                )
            finally:
                private_postgres.accept_connections(database)
            after = len(load.accepted)
            wait_until(
                serving_and(lambda: load.accepted_more(after + 10)), 60, "submits after refusals"
            )
        output = dispatcher.output()
        assert dispatcher.popen.poll() is None, f"rexec serve exited:\n{output[-6000:]}"
        unclear = [r for r in load.refusals if r.status != 503 or "database" not in r.message]
        assert not unclear, f"refused without a clear 503: {unclear[:5]}"
        assert "database unreachable" in output, "the outage is logged"

        done = plane.client.wait(list(load.accepted), timeout=120)
        assert_all_succeeded_once(plane, load.accepted, done)
        assert set(load.accepted.values()) <= set(executions(runs)), "every task ran to its end"
        print(f"accepted {len(load.accepted)}, refused {len(load.refusals)}")
