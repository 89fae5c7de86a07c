"""Security tests run the real API, broker and Redis (SQLite is enough for the metadata)."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import anyio_backend, api, pool, runtime  # noqa: F401  (fixtures)


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
async def pool_name_b(api: httpx.AsyncClient, pool_name: str) -> str:  # noqa: F811
    """A second pool, whose queue the first pool's agents must not reach."""
    name = f"{pool_name}-b"
    response = await api.post("/v1/pools", json={"name": name})
    assert response.status_code == 201, response.text
    return name
