"""Fixtures for the agent's tests: the session's vhost, with the core topology and a fresh pool."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from rexec.dispatcher import topology
from rexec.schemas.names import RedisKeys
from rexec.schemas.settings import Settings, load_settings
from tests.conftest import REDIS_URL
from tests.support import SIGNER
from tests.worker.harness import Broker, open_broker


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def agent_settings(amqp_url: str, redis_prefix: str, tmp_path: Path) -> Settings:
    return load_settings(
        {},
        amqp_url=amqp_url,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        heartbeat_ttl=3.0,
        signing_public_keys=SIGNER.public_key,
        log_dir=str(tmp_path / "task-logs"),
    )


@pytest.fixture
def keys(redis_prefix: str) -> RedisKeys:
    return RedisKeys(redis_prefix)


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[Broker]:
    async with open_broker(amqp_url) as broker:
        yield broker


@pytest.fixture
async def pool(broker: Broker, pool_name: str) -> str:
    await topology.declare_pool(broker.channel, pool_name, delivery_limit=5)
    return pool_name
