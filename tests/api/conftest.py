"""The API against a real runtime: the metadata database (SQLite and PostgreSQL), RabbitMQ, Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from rexec.dispatcher.api import create_app
from rexec.dispatcher.runtime import Runtime, open_runtime
from rexec.schemas.settings import Settings
from tests.conftest import ADMIN_HEADERS


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    async with open_runtime(settings) as rt:
        yield rt


@pytest.fixture
async def api(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client calling the app in this event loop (it shares the runtime's connections)."""
    transport = httpx.ASGITransport(app=create_app(runtime))  # type: ignore[arg-type]
    async with httpx.AsyncClient(
        transport=transport, base_url="http://rexec.test", headers=ADMIN_HEADERS
    ) as client:
        yield client


@pytest.fixture
async def pool(api: httpx.AsyncClient, pool_name: str) -> str:
    response = await api.post("/v1/pools", json={"name": pool_name})
    assert response.status_code == 201, response.text
    return pool_name
