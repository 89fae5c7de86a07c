from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rexec.dispatcher.runtime import Runtime, open_runtime
from rexec.schemas.settings import Settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def rt(settings: Settings) -> AsyncIterator[Runtime]:
    """A whole runtime (database, Redis, broker) on the session's isolated services."""
    async with open_runtime(settings) as runtime:
        yield runtime
