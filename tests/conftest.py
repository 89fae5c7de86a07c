"""Test isolation: each test session gets its own RabbitMQ vhost, Redis key prefix and database.

The services are the real ones on this machine (``make test`` checks they answer). Nothing a run
creates is visible to another run, and everything is removed when the session ends.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import anyio
import asyncpg
import httpx
import pytest
import redis

from rexec.schemas.names import AGENT_USER_PREFIX
from rexec.schemas.settings import Settings, load_settings
from tests.support import REPO, SIGNER, SIGNING_KEY

AMQP_HOST = os.environ.get("REXEC_TEST_AMQP_HOST", "127.0.0.1:5672")
MANAGEMENT_URL = os.environ.get("REXEC_TEST_MANAGEMENT_URL", "http://127.0.0.1:15672")
REDIS_URL = os.environ.get("REXEC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("REXEC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
BOOTSTRAP_KEY = "rexec_test_bootstrap_" + uuid.uuid4().hex
"""The bootstrap admin key of every dispatcher the tests start (REXEC_API_KEY)."""
ADMIN_HEADERS = {"authorization": f"Bearer {BOOTSTRAP_KEY}"}


@pytest.fixture(autouse=True)
def task_code_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test task modules (``tests.tasks`` and friends) are the customer code here: on the
    path of every agent and child process a test starts, as a customer's would be."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*paths, str(REPO)]))


@pytest.fixture(autouse=True)
def api_key_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Every test's clients, CLI and ``rexec serve`` processes use the bootstrap admin key,
    and no test reads or writes the developer's own credentials file."""
    monkeypatch.setenv("REXEC_API_KEY", BOOTSTRAP_KEY)
    monkeypatch.setenv("REXEC_CREDENTIALS_FILE", str(tmp_path / "rexec-credentials"))
    return BOOTSTRAP_KEY


@pytest.fixture(scope="session")
def run_id(worker_id: str) -> str:
    return f"{uuid.uuid4().hex[:8]}-{worker_id}"


@pytest.fixture(scope="session")
def vhost(run_id: str) -> Iterator[str]:
    name = f"rexec-test-{run_id}"
    api = httpx.Client(base_url=MANAGEMENT_URL, auth=("guest", "guest"), timeout=30)
    path = quote(name, safe="")
    try:
        api.put(f"/api/vhosts/{path}").raise_for_status()
    except httpx.TimeoutException as exc:
        raise RuntimeError(
            f"RabbitMQ did not create vhost {name} within 30 s: the broker is wedged "
            "(out of file handles? `rabbitmqctl eval 'file_handle_cache:info().'` tells)"
        ) from exc
    api.put(
        f"/api/permissions/{path}/guest",
        json={"configure": ".*", "write": ".*", "read": ".*"},
    ).raise_for_status()
    global _session_vhost
    _session_vhost = name
    yield name
    _session_vhost = None
    # Agents' broker users outlive the vhost: remove the ones this session's agents were given.
    permissions = api.get(f"/api/vhosts/{path}/permissions")
    if permissions.is_success:
        for entry in permissions.json():
            if entry["user"].startswith(AGENT_USER_PREFIX):
                api.delete(f"/api/users/{quote(entry['user'], safe='')}")
    # The broker deletes the vhost but may answer late (it waits on other nodes it knows);
    # a leftover empty vhost disturbs nobody.
    with contextlib.suppress(httpx.TimeoutException):
        api.delete(f"/api/vhosts/{path}")


_session_vhost: str | None = None
"""The session's vhost once a test asked for it."""


@pytest.fixture(autouse=True)
def queues_deleted_after_each_test() -> Iterator[None]:
    """Delete the queues a test declared in the session's vhost once it ends.

    Every quorum queue reserves broker file handles for as long as it lives. A broker started
    with 1,024 descriptors (this machine's, through PAM) holds about 300 of them; past that,
    vhost creation and new channels block forever. Tests within one session run one at a time,
    so everything in the vhost at a test's end is that test's own.
    """
    yield
    if _session_vhost is None:
        return
    path = quote(_session_vhost, safe="")
    with httpx.Client(base_url=MANAGEMENT_URL, auth=("guest", "guest"), timeout=30) as api:
        listed = api.get(f"/api/queues/{path}", params={"columns": "name"})
        listed.raise_for_status()
        for queue in listed.json():
            api.delete(f"/api/queues/{path}/{quote(queue['name'], safe='')}")


@pytest.fixture(scope="session")
def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@{AMQP_HOST}/{quote(vhost, safe='')}"


@pytest.fixture(scope="session")
def redis_prefix(run_id: str) -> Iterator[str]:
    prefix = f"rexec-test-{run_id}"
    yield prefix
    forget_redis_prefix(prefix)


def forget_redis_prefix(prefix: str) -> None:
    """Delete the shared Redis's keys and agent users under ``prefix``, sub-prefixes too (fault
    tests isolate each test under "<prefix>-<id>")."""
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    users = [u for u in map(str, client.acl_users()) if u.startswith(f"{prefix}-")]
    if users:
        client.acl_deluser(*users)
    client.close()


@pytest.fixture(scope="session")
def postgres_url(run_id: str) -> Iterator[str]:
    """A database of this session's own on the local PostgreSQL, with the schema migrated."""
    name = f"rexec_test_{run_id.replace('-', '_')}"
    anyio.run(_admin, f'CREATE DATABASE "{name}"')
    url = f"postgresql+asyncpg://{POSTGRES_DSN.split('://', 1)[1]}/{name}"
    from rexec.dispatcher.db.migrate import upgrade

    upgrade(url)
    yield url
    anyio.run(_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(f"{POSTGRES_DSN}/postgres")
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'rexec.db'}"
    from rexec.dispatcher.db.migrate import upgrade

    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Core tests run once on SQLite (the default) and once on PostgreSQL (production)."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def settings(database_url: str, amqp_url: str, redis_prefix: str, tmp_path: Path) -> Settings:
    return load_settings(
        {},
        database_url=database_url,
        amqp_url=amqp_url,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        heartbeat_ttl=3.0,
        signing_key=SIGNING_KEY,
        signing_public_keys=SIGNER.public_key,
        api_key=BOOTSTRAP_KEY,
        # The broker's management API of REXEC_TEST_MANAGEMENT_URL (the default's otherwise).
        management_url=MANAGEMENT_URL.replace("://", "://guest:guest@", 1),
    )


@pytest.fixture
def pool_name() -> str:
    """A pool name no other test uses, so tests sharing a vhost and database never collide."""
    return f"p{uuid.uuid4().hex[:10]}"
