"""The CLI in-process: parsing alone, or against the real app served by uvicorn in the test's loop."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
import uvicorn

from rexec.dispatcher.api import create_app
from rexec.dispatcher.runtime import Runtime, open_runtime
from rexec.schemas.settings import Settings
from tests.support import await_until, free_port


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    async with open_runtime(settings) as rt:
        yield rt


@pytest.fixture
async def api_url(runtime: Runtime) -> AsyncIterator[str]:
    """The API on a free port, served from this event loop (the CLI runs in a thread)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(runtime),
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)

        async def started() -> bool:
            return bool(server.started)

        await await_until(started, 10, "the API server to start")
        yield f"http://127.0.0.1:{port}"
        server.should_exit = True
