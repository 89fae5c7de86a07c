"""``rexec serve``: the orchestration plane (API, relay, events and dead-letter consumers,
watchdog) in one process."""

from __future__ import annotations

import logging

import anyio
import uvicorn
from aiormq.exceptions import AMQPConnectionError

from rexec.schemas import logs, tls, tracing
from rexec.schemas.amqp import BrokerUnreachable, parse_amqp_urls, safe_url
from rexec.schemas.settings import Settings

from . import credentials
from .api import create_app
from .db.migrate import upgrade
from .deadletters import run_dead_letters
from .direct import DirectPublisher
from .events import run_events
from .relay import run_relay
from .runtime import open_runtime
from .slowclients import protocol_class
from .watchdog import Watchdog

log = logging.getLogger("rexec.serve")

SHUTDOWN_GRACE = 5
"""Seconds open requests and connections get on SIGTERM. Without a bound, one idle HTTPS
keep-alive client holds the shutdown for the TLS close timeout (30 s)."""


async def serve(settings: Settings) -> None:
    https = tls.server_files(settings.api_tls_cert, settings.api_tls_key)
    scheme = "https" if https else "http"
    async with open_runtime(settings) as rt:
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(rt),
                host=settings.api_host,
                port=settings.api_port,
                log_config=None,
                access_log=False,
                ssl_certfile=https[0] if https else None,
                ssl_keyfile=https[1] if https else None,
                timeout_graceful_shutdown=SHUTDOWN_GRACE,
                # Slow or idle clients: a deadline on each request, and a cap on connections.
                http=protocol_class(settings.api_read_timeout),
                limit_concurrency=settings.api_max_connections,
            )
        )
        async with anyio.create_task_group() as tg:
            rt.background = tg
            if settings.outbox_lease > 0:
                rt.direct = DirectPublisher(rt)
                await tg.start(rt.direct.run)
            tg.start_soon(run_relay, rt)
            tg.start_soon(run_events, rt)
            tg.start_soon(run_dead_letters, rt)
            tg.start_soon(Watchdog(rt).run)
            if settings.agent_credentials == "scoped":
                tg.start_soon(credentials.keep, rt)
            log.info(
                "serving", extra={"api": f"{scheme}://{settings.api_host}:{settings.api_port}"}
            )
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
    except (AMQPConnectionError, BrokerUnreachable) as exc:
        # A certificate the broker's URL does not trust will not fix itself: say what to set.
        if (problem := tls.certificate_problem(exc)) is None:
            raise
        nodes = ", ".join(safe_url(url) for url in parse_amqp_urls(settings.amqp_url))
        where = f"RabbitMQ at {nodes}"
        raise SystemExit(f"rexec serve: {tls.describe(problem, 'amqp', where)}") from None
    finally:
        tracing.shutdown()
