"""Reading a task's log from the agent that keeps it (task logs stay in the execution plane).

Take a :class:`~rexec.schemas.api.LogGrant` from ``RexecClient.log_grant``, then stream the log from
the agent's log server with it. Anything that stops the read (no log URL, the agent gone, a
refusal) raises :class:`AgentLogUnavailable` whose text says why.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

import httpx

from rexec.schemas.api import LogGrant

CONNECT_TIMEOUT = 5.0


class AgentLogUnavailable(Exception):
    """The agent's copy of the log could not be read; ``str()`` says why."""


def agent_log_url(grant: LogGrant) -> str:
    return f"{grant.log_url}/logs/{quote(grant.task_id, safe='')}/{grant.attempt}"


def stream_agent_log(
    grant: LogGrant,
    write: Callable[[bytes], None],
    *,
    follow: bool = False,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """Pass the log's bytes to ``write`` as they arrive; the number of bytes read."""
    if not grant.log_url:
        raise AgentLogUnavailable(
            f"agent {grant.agent_id} announced no log URL (it runs without a health port: "
            "set REXEC_HEALTH_PORT, or REXEC_AGENT_LOG_URL, on the agent)"
        )
    url = agent_log_url(grant)
    # No read timeout while following: a quiet task writes nothing for a while.
    timeout = httpx.Timeout(CONNECT_TIMEOUT, read=None if follow else 30.0)
    received = 0
    try:
        with (
            httpx.Client(transport=transport, timeout=timeout) as http,
            http.stream(
                "GET",
                url,
                params={"follow": "1"} if follow else None,
                headers={"authorization": f"Bearer {grant.grant}"},
            ) as response,
        ):
            if response.status_code != 200:
                detail = response.read().decode(errors="replace").strip()[:500]
                raise AgentLogUnavailable(
                    f"agent {grant.agent_id} at {grant.log_url} refused "
                    f"({response.status_code}): {detail}"
                )
            for chunk in response.iter_bytes():
                write(chunk)
                received += len(chunk)
    except httpx.TransportError as exc:
        what = "was cut off" if received else "could not be reached"
        raise AgentLogUnavailable(
            f"agent {grant.agent_id} at {grant.log_url} {what} "
            f"({type(exc).__name__}: {exc or 'no detail'})"
        ) from None
    return received
