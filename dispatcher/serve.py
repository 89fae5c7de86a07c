"""``rexec serve``: the orchestration plane (API, relay, events consumer, watchdog) in one process."""

from __future__ import annotations

import logging

import anyio
import uvicorn

from schemas import logs, tracing
from schemas.settings import Settings

from .api import create_app
from .db.migrate import upgrade
from .events import run_events
from .relay import run_relay
from .runtime import open_runtime
from .watchdog import Watchdog

log = logging.getLogger("rexec.serve")


async def serve(settings: Settings) -> None:
    async with open_runtime(settings) as rt:
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(rt),
                host=settings.api_host,
                port=settings.api_port,
                log_config=None,
                access_log=False,
            )
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_relay, rt)
            tg.start_soon(run_events, rt)
            tg.start_soon(Watchdog(rt).run)
            log.info("serving", extra={"api": f"http://{settings.api_host}:{settings.api_port}"})
            # uvicorn handles SIGINT/SIGTERM: when it returns, stop everything else too.
            await server.serve()
            tg.cancel_scope.cancel()
    log.info("stopped")


MIN_BOOTSTRAP_KEY = 16


class BootstrapKeyError(ValueError):
    """A bootstrap admin key too short to be a secret."""


def check_bootstrap_key(settings: Settings) -> None:
    """Refuse a guessable bootstrap key; warn when there is none (only stored keys work)."""
    key = settings.api_key
    if key and len(key) < MIN_BOOTSTRAP_KEY:
        raise BootstrapKeyError(
            f"REXEC_API_KEY is {len(key)} characters long: the bootstrap admin key must have at "
            f"least {MIN_BOOTSTRAP_KEY}; make one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    if not key:
        log.warning(
            "REXEC_API_KEY is not set: there is no bootstrap admin key, so only API keys made "
            "earlier with `rexec apikey create` are accepted; set it to make the first ones"
        )


def main(settings: Settings) -> None:
    logs.configure()
    check_bootstrap_key(settings)
    tracing.configure("rexec-dispatcher")
    upgrade(settings.database_url)
    try:
        anyio.run(serve, settings)
    finally:
        tracing.shutdown()
