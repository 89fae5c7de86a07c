"""Connecting to a RabbitMQ cluster given as several node URLs, for both planes.

``REXEC_AMQP_URL`` may list the nodes of one cluster, comma-separated. aio-pika's
``RobustConnection`` reconnects to its one URL forever, so losing that node would stall a
plane although the cluster still serves. ``ClusterConnection`` moves to the next node each
time its node fails it: aio-pika calls ``_on_connection_close`` both when a connect attempt
fails and when an open connection is lost, before it waits ``reconnect_interval`` and tries
again, so the next attempt goes to the next node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from aio_pika import RobustConnection
from aio_pika.abc import AbstractConnection, TimeoutType
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

SCHEMES = frozenset({"amqp", "amqps"})
ATTEMPT_TIMEOUT = 10.0
"""Seconds one connect attempt may take, the first and every reconnect: a node that drops
packets instead of refusing must not hold the connection away from the other nodes."""


class BrokerUnreachable(ConnectionError):
    """No node of the cluster accepted a connection; the message names each node (without
    its password) and why it failed."""


def connection_up(connection: AbstractConnection) -> bool:
    """Whether a (robust) connection is open now, not closed nor reconnecting."""
    return not connection.is_closed and connection.connected.is_set()


def safe_url(url: str | URL) -> str:
    """A URL fit for logs and error messages: the password replaced by ``***``."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return "(invalid URL)"
    return str(parsed.with_password("***") if parsed.password else parsed)


def parse_amqp_urls(value: str) -> tuple[URL, ...]:
    """The node URLs of ``REXEC_AMQP_URL``: one URL, or several separated by commas.

    Every node must be an ``amqp://`` or ``amqps://`` URL with a host, and all must name the
    same virtual host (they are nodes of one cluster). A comma inside a password must be
    written ``%2C``.
    """
    parts = [part.strip() for part in value.split(",")]
    if not any(parts):
        raise ValueError("REXEC_AMQP_URL is empty; set it to amqp://user:password@host:5672/vhost")
    if not all(parts):
        raise ValueError(
            f"REXEC_AMQP_URL has an empty entry between commas ({_safe_list(parts)}); list the "
            "nodes as amqp://…@node1/vhost,amqp://…@node2/vhost"
        )
    nodes: list[URL] = []
    for part in parts:
        try:
            url = URL(part)
            host = url.host
        except (ValueError, TypeError) as exc:
            raise ValueError(f"REXEC_AMQP_URL entry {safe_url(part)} is not a URL: {exc}") from None
        if url.scheme not in SCHEMES or not host:
            raise ValueError(
                f"REXEC_AMQP_URL entry {safe_url(part)} is not an amqp:// or amqps:// URL with a "
                "host, e.g. amqp://user:password@host:5672/vhost"
            )
        nodes.append(url)
    vhosts = {vhost_of(str(url)) for url in nodes}
    if len(vhosts) > 1:
        raise ValueError(
            f"REXEC_AMQP_URL lists nodes with different virtual hosts ({sorted(vhosts)}); the "
            "nodes of one cluster must all name the same virtual host"
        )
    return tuple(nodes)


def vhost_of(value: str) -> str:
    """The virtual host the URLs name (the first node's; all nodes name the same one)."""
    path = urlsplit(value.split(",", 1)[0].strip()).path
    return unquote(path[1:]) if len(path) > 1 else "/"


class ClusterConnection(RobustConnection):
    """A robust connection that goes on to the next node whenever its node fails it."""

    def __init__(
        self,
        url: URL,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        nodes: Sequence[URL] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(url, loop=loop, **kwargs)
        self.nodes: tuple[URL, ...] = tuple(nodes) or (self.url,)
        self._node = self.nodes.index(self.url) if self.url in self.nodes else 0

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # Called for a failed connect attempt and for a lost connection alike; the robust
        # loop then waits ``reconnect_interval`` and connects to ``self.url`` again.
        if not self.close_called and len(self.nodes) > 1:
            self._node = (self._node + 1) % len(self.nodes)
            self.url = self.nodes[self._node]
        await super()._on_connection_close(closing)


async def connect_cluster(
    urls: str,
    *,
    connection_name: str,
    reconnect_interval: float | None = None,
    attempt_timeout: TimeoutType = ATTEMPT_TIMEOUT,
) -> ClusterConnection:
    """A robust connection to the first node of ``urls`` that answers, trying each once.

    Raises ``ValueError`` for a malformed ``urls`` and ``BrokerUnreachable`` when no node
    accepts; afterwards the connection reconnects on its own, node after node, each attempt
    bounded by ``attempt_timeout``.
    """
    nodes = parse_amqp_urls(urls)
    options: dict[str, Any] = {"client_properties": {"connection_name": connection_name}}
    if reconnect_interval is not None:
        options["reconnect_interval"] = reconnect_interval
    failures: list[str] = []
    last: BaseException | None = None
    for start in nodes:
        connection = ClusterConnection(start, nodes=nodes, **options)
        try:
            await connection.connect(timeout=attempt_timeout)
        except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
            failures.append(f"{safe_url(start)}: {_reason(exc)}")
            last = exc
            await connection.close()
            continue
        return connection
    raise BrokerUnreachable(
        f"no RabbitMQ node accepted a connection ({'; '.join(failures)})"
    ) from last  # the cause tells a certificate problem from a node that is down


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _safe_list(parts: list[str]) -> str:
    return ",".join(safe_url(part) if part else "" for part in parts)
