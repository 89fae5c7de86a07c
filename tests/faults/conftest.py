"""Fault tests: real dispatcher and agent processes, real faults, assertions on the database.

Heartbeats are short here (TTL 2 s, watchdog every 0.5 s) so failover happens in seconds.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from rexec.client import RexecClient
from rexec.schemas.api import TaskState, TaskView
from rexec.schemas.settings import Settings, load_settings
from tests.conftest import MANAGEMENT_URL, REDIS_URL
from tests.e2e.conftest import Plane, pytest_runtest_makereport  # noqa: F401  (logs on failure)
from tests.faults.servers import (
    PrivateCluster,
    PrivatePostgres,
    PrivateRabbit,
    PrivateRedis,
    PrivateSentinel,
)

FAST = {"heartbeat_ttl": 2.0, "watchdog_interval": 0.5}
ALLOW = ["--allow", "tests.tasks:*", "--allow", "tests.faults.tasks:*"]


@pytest.fixture
def fault_settings(sqlite_url: str, amqp_url: str, redis_prefix: str) -> Settings:
    return load_settings(
        {},
        database_url=sqlite_url,
        amqp_url=amqp_url,
        redis_url=REDIS_URL,
        redis_prefix=f"{redis_prefix}-{uuid.uuid4().hex[:6]}",
        management_url=MANAGEMENT_URL.replace("://", "://guest:guest@", 1),
        **FAST,
    )


@pytest.fixture(scope="session")
def private_rabbit(run_id: str) -> Iterator[PrivateRabbit]:
    """A RabbitMQ node of this session's own, for tests that restart the broker."""
    rabbit = PrivateRabbit(f"rexec-faults-{run_id}")
    try:
        rabbit.start()
        yield rabbit
    finally:
        rabbit.cleanup()


@pytest.fixture(scope="session")
def sentinel_servers() -> Iterator[PrivateSentinel]:
    """A master, a replica and three Sentinels of this session's own, all stopped at its end."""
    group = PrivateSentinel()
    try:
        group.start()
        yield group
    finally:
        group.cleanup()


@pytest.fixture
def sentinel_group(sentinel_servers: PrivateSentinel) -> PrivateSentinel:
    """The session's Sentinel group with a master and a synced replica (healed if an earlier
    test killed a node), ready to fail over."""
    if not sentinel_servers.settled():
        sentinel_servers.heal()
    return sentinel_servers


@pytest.fixture(scope="session")
def rabbit_cluster(run_id: str) -> Iterator[PrivateCluster]:
    """Three RabbitMQ nodes of this session's own in one cluster, for tests that lose a node."""
    cluster = PrivateCluster(f"rexec-cluster-{run_id}")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A Redis of this test's own that keeps nothing: a restart loses every key."""
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of this session's own, for tests that restart the database."""
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def private_postgres_url(private_postgres: PrivatePostgres) -> str:
    """A migrated database of this test's own on the private server."""
    return private_postgres.create_database()


@pytest.fixture
def plane(fault_settings: Settings, tmp_path: Path) -> Iterator[Plane]:
    plane = Plane(fault_settings, tmp_path)
    yield plane
    plane.close()


def assert_each_terminal_once(plane: Plane | RexecClient, tasks: list[TaskView]) -> None:
    """Every task ended, and its history holds exactly one terminal transition."""
    terminal = {s.value for s in TaskState if s.terminal}
    for task in tasks:
        assert task.state.terminal, f"task {task.id} is still {task.state}"
        client = plane.client if isinstance(plane, Plane) else plane
        ends = [h for h in client.history(task.id) if h.to_state in terminal]
        assert len(ends) == 1, f"task {task.id} ended {len(ends)} times: {ends}"


def with_settings(settings: Settings, **changes: object) -> Settings:
    return msgspec.structs.replace(settings, **changes)
