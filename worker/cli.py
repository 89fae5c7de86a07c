"""``rexec-agent``: register with the orchestration plane, then run the agent until SIGTERM.

SIGTERM or SIGINT starts the graceful drain; a second one hands running attempts back at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

import anyio

from rexec.schemas import logs, messages, tracing
from rexec.schemas.api import AgentRegister
from rexec.schemas.names import validate_pool_name
from rexec.schemas.settings import Settings, load_settings

from .agent import Agent, AgentError
from .credentials import registered_settings
from .registration import RegistrationError, register
from .secrets import SecretsBackend, SecretsConfigError, build_backend, mask_logs

log = logging.getLogger("rexec.agent.cli")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rexec-agent",
        description="Run a rexec agent for one pool. The token comes from REXEC_AGENT_TOKEN.",
    )
    p.add_argument("--pool", required=True, help="the pool whose tasks this agent runs")
    p.add_argument(
        "--concurrency", type=int, default=4, help="tasks run at once (default: %(default)s)"
    )
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PATTERN",
        help="glob of targets this agent may run, e.g. 'myapp.tasks:*' or 'echo'; repeatable",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds running tasks get to finish on SIGTERM (default: %(default)s)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    options = p.parse_args(argv)
    if not options.allow:
        p.error(
            "at least one --allow PATTERN is required: the agent runs only targets you allow "
            "(e.g. --allow 'myapp.tasks:*' for functions, --allow echo for a command)"
        )
    if options.concurrency < 1:
        p.error("--concurrency must be at least 1")
    try:
        validate_pool_name(options.pool)
        settings = load_settings()
    except ValueError as exc:
        p.error(str(exc))
    if not settings.agent_token:
        p.error("no agent token: set REXEC_AGENT_TOKEN (create one with `rexec token create`)")
    try:
        backend = build_backend(settings)  # before registering: a misconfiguration is ours
    except SecretsConfigError as exc:
        print(f"rexec-agent: {exc}", file=sys.stderr)
        return 1
    logs.configure()
    tracing.configure("rexec-agent")
    try:
        anyio.run(_serve, settings, options, backend)
    except (RegistrationError, AgentError) as exc:
        print(f"rexec-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        tracing.shutdown()  # export the spans still buffered
    return 0


async def _serve(settings: Settings, options: argparse.Namespace, backend: SecretsBackend) -> None:
    hostname = socket.gethostname()
    registered = await register(
        settings,
        settings.agent_token,
        AgentRegister(
            pool=options.pool,
            hostname=hostname,
            pid=os.getpid(),
            concurrency=options.concurrency,
            version=messages.PROTOCOL_VERSION,
            protocol_minor=messages.PROTOCOL_MINOR,
            allow=options.allow,
            log_url=log_url(settings, hostname),
        ),
    )
    settings = registered_settings(settings, registered)
    log.info(
        "registered",
        extra={
            "agent_id": registered.agent_id,
            "pool": registered.pool,
            "heartbeat_ttl": registered.heartbeat_ttl,
            "protocol": messages.protocol_name(
                registered.protocol_version, registered.protocol_minor
            ),
            "credentials": "scoped" if registered.credentials else "own",
        },
    )
    agent = Agent(
        settings,
        agent_id=registered.agent_id,
        pool=options.pool,
        allow=options.allow,
        concurrency=options.concurrency,
        drain_timeout=options.drain_timeout,
        hostname=hostname,
        secrets_backend=backend,
    )
    mask_logs(agent.masker)  # every log line of the agent, from here on
    failure: AgentError | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, agent)
        try:
            await agent.run()
        except AgentError as exc:  # raised out of the task group unwrapped, for main()
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


def log_url(settings: Settings, hostname: str) -> str:
    """Where the CLI fetches this agent's task logs: ``REXEC_AGENT_LOG_URL``, else the health
    port on this host; empty without a health port (then logs cannot be fetched)."""
    if settings.agent_log_url:
        return settings.agent_log_url.rstrip("/")
    if settings.health_port:
        return f"http://{hostname}:{settings.health_port}"
    return ""


async def _watch_signals(agent: Agent) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        received = 0
        async for signum in signals:
            received += 1
            name = signal.Signals(signum).name
            if received == 1:
                log.info(f"{name}: draining", extra={"agent_id": agent.agent_id})
                agent.request_shutdown()
            else:
                log.warning(
                    f"{name} again: handing running tasks back now",
                    extra={"agent_id": agent.agent_id},
                )
                agent.request_shutdown(immediate=True)


if __name__ == "__main__":
    sys.exit(main())
