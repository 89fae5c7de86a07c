"""RabbitMQ's management API: agents' broker users, and cutting connections off at once.

Each agent gets a broker user of its own whose permissions the broker enforces (read its
pool's queue and its control queue, write events and dead letters, configure nothing). A hung
agent (SIGSTOP) keeps its TCP connection open and its prefetched deliveries unacked until the
broker's heartbeat gives up, minutes later: closing the connection returns them now.
"""

from __future__ import annotations

import functools
import logging
import re
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx

from rexec.schemas import names
from rexec.schemas.amqp import vhost_of
from rexec.schemas.settings import Settings

log = logging.getLogger("rexec.management")

TIMEOUT = 5.0


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One for the process: a client made without one loads the CA bundle again, 20 ms of
    the event loop's time at best. 50 agents registering at once (two calls each) blocked
    the loop for so long that their registrations timed out."""
    return httpx.create_ssl_context()


class ManagementError(Exception):
    """The management API refused or could not be reached; the text says what to check."""


def agent_permissions(pool: str, agent_id: str) -> dict[str, str]:
    """What an agent's broker user may do, as RabbitMQ permission regular expressions."""
    readable = (names.pool_queue(pool), names.agent_queue(agent_id))
    writable = (names.EVENTS_EXCHANGE, names.DEAD_EXCHANGE)
    return {
        "configure": "^$",
        "write": "^(" + "|".join(re.escape(n) for n in writable) + ")$",
        "read": "^(" + "|".join(re.escape(n) for n in readable) + ")$",
    }


class Management:
    """A short-lived client of the management API named by ``REXEC_MANAGEMENT_URL``."""

    def __init__(self, settings: Settings) -> None:
        if not settings.management_url:
            raise ManagementError(
                "REXEC_MANAGEMENT_URL is empty, so agents' broker users cannot be managed: "
                "set it, or set REXEC_AGENT_CREDENTIALS=shared"
            )
        parts = urlsplit(settings.management_url)
        self._auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
        self._base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}"
        self.vhost = vhost_of(settings.amqp_url)

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self._base, auth=self._auth, timeout=TIMEOUT, verify=_tls_context()
        )

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            async with self._client() as api:
                response = await api.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ManagementError(
                f"cannot reach RabbitMQ's management API at {self._base}: {exc}; check "
                "REXEC_MANAGEMENT_URL and that the rabbitmq_management plugin is enabled"
            ) from None
        if response.status_code >= 400 and not (method == "DELETE" and response.status_code == 404):
            raise ManagementError(
                f"RabbitMQ's management API refused {method} {path} "
                f"({response.status_code}): {response.text[:300]}"
            )
        return response

    async def create_agent_user(self, pool: str, agent_id: str, password: str) -> str:
        user = names.agent_broker_user(agent_id)
        quoted = quote(user, safe="")
        await self._call("PUT", f"/api/users/{quoted}", json={"password": password, "tags": ""})
        await self._call(
            "PUT",
            f"/api/permissions/{quote(self.vhost, safe='')}/{quoted}",
            json=agent_permissions(pool, agent_id),
        )
        return user

    async def delete_user(self, user: str) -> None:
        await self._call("DELETE", f"/api/users/{quote(user, safe='')}")

    async def close_connections(self, match: Callable[[dict[str, Any]], bool], reason: str) -> int:
        """Close the vhost's connections ``match`` picks; return how many were closed."""
        response = await self._call("GET", f"/api/vhosts/{quote(self.vhost, safe='')}/connections")
        closed = 0
        for connection in response.json():
            if match(connection):
                await self._call(
                    "DELETE",
                    f"/api/connections/{quote(connection['name'], safe='')}",
                    headers={"X-Reason": reason},
                )
                closed += 1
        return closed


def connection_name(connection: dict[str, Any]) -> str:
    return str(connection.get("client_properties", {}).get("connection_name", ""))


async def close_agent_connections(settings: Settings, pool: str, agent_id: str, reason: str) -> int:
    """Close every AMQP connection the agent opened; return how many were closed."""
    if not settings.management_url:
        return 0
    prefix = f"rexec-agent {pool}/{agent_id}@"
    user = names.agent_broker_user(agent_id)
    try:
        return await Management(settings).close_connections(
            lambda c: connection_name(c).startswith(prefix) or c.get("user") == user, reason
        )
    except ManagementError as exc:
        log.warning(
            "could not close the agent's connections",
            extra={"agent_id": agent_id, "error": str(exc)},
        )
        return 0
