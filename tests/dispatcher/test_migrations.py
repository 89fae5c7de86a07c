"""Replicas of ``rexec serve`` starting together migrate one PostgreSQL database safely."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import anyio
import asyncpg
import pytest

from tests.conftest import POSTGRES_DSN, _admin


@pytest.fixture
def fresh_postgres() -> Iterator[str]:
    name = f"rexec_migrate_{uuid.uuid4().hex[:8]}"
    anyio.run(_admin, f'CREATE DATABASE "{name}"')
    yield f"{POSTGRES_DSN.split('://', 1)[1]}/{name}"
    anyio.run(_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_concurrent_upgrades_take_turns_and_all_succeed(fresh_postgres: str) -> None:
    url = f"postgresql+asyncpg://{fresh_postgres}"
    script = "import sys; from rexec.dispatcher.db.migrate import upgrade; upgrade(sys.argv[1])"
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", script, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(4)
    ]
    outputs = [replica.communicate(timeout=120)[0].decode() for replica in replicas]
    assert [replica.returncode for replica in replicas] == [0] * 4, "\n".join(outputs)
    assert len(anyio.run(_versions, fresh_postgres)) == 1


async def _versions(dsn: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(f"postgresql://{dsn}")
    try:
        return list(await connection.fetch("SELECT version_num FROM alembic_version"))
    finally:
        await connection.close()
