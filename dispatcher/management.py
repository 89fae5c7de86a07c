"""RabbitMQ's management API, used to cut off a dead agent's connection at once.

A hung agent (SIGSTOP) keeps its TCP connection open and its prefetched deliveries unacked
until the broker's heartbeat gives up, minutes later. Closing the connection returns them now.
"""

from __future__ import annotations

import logging
from urllib.parse import quote, unquote, urlsplit

import httpx

from schemas.amqp import vhost_of
from schemas.settings import Settings

log = logging.getLogger("rexec.management")


async def close_agent_connections(settings: Settings, pool: str, agent_id: str, reason: str) -> int:
    """Close every AMQP connection the agent opened; return how many were closed."""
    if not settings.management_url:
        return 0
    parts = urlsplit(settings.management_url)
    auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
    base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}"
    prefix = f"rexec-agent {pool}/{agent_id}@"
    vhost = quote(vhost_of(settings.amqp_url), safe="")
    closed = 0
    try:
        async with httpx.AsyncClient(base_url=base, auth=auth, timeout=5.0) as api:
            response = await api.get(f"/api/vhosts/{vhost}/connections")
            response.raise_for_status()
            for connection in response.json():
                name = connection.get("client_properties", {}).get("connection_name", "")
                if name.startswith(prefix):
                    await api.delete(
                        f"/api/connections/{quote(connection['name'], safe='')}",
                        headers={"X-Reason": reason},
                    )
                    closed += 1
    except httpx.HTTPError as exc:
        log.warning(
            "could not close the agent's connections",
            extra={"agent_id": agent_id, "error": str(exc)},
        )
    return closed
