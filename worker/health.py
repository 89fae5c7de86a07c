"""The agent's health server: what kubelet probes, and what Prometheus scrapes.

- ``GET /healthz``: 200 while the agent is alive. Answering at all shows that its event loop
  is responsive; it turns 503 only when a shutdown has run past its drain deadline.
- ``GET /readyz``: 200 while the agent is connected to the broker and Redis and consumes its
  pool's queue; 503 with ``{"status": "unavailable", "reason": ...}`` otherwise (starting,
  draining, broker reconnecting, Redis unreachable, intake paused because every slot is busy).
- ``GET /metrics``: the agent's Prometheus metrics (``rexec.worker.metrics``).
- ``GET /logs/<task_id>/<attempt>``: one attempt's log, against a grant the orchestration plane
  signed (``rexec.worker.logserver``).

A tiny ASGI app served by uvicorn on the agent's own event loop. uvicorn's signal handling is
turned off: SIGTERM belongs to the agent's drain.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import anyio
import msgspec
import uvicorn
from anyio.abc import TaskStatus

from . import logserver
from .logserver import LogSource
from .metrics import CONTENT_TYPE, AgentMetrics
from .status import AgentStatus

log = logging.getLogger("rexec.agent.health")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_json = msgspec.json.Encoder()
STOP_TIMEOUT = 2
"""Seconds the server gets to close its connections when the agent stops."""


class HealthApp:
    """The ASGI application: three read-only routes over the agent's state."""

    def __init__(self, agent: AgentStatus, metrics: AgentMetrics, logs: LogSource) -> None:
        self.agent = agent
        self.metrics = metrics
        self.logs = logs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        path, method = scope["path"], scope["method"]
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", "text/plain", method)
        elif path == "/healthz":
            await self._status(send, method, self.agent.liveness())
        elif path == "/readyz":
            await self._status(send, method, self.agent.readiness())
        elif path == "/metrics":
            await _respond(send, 200, self.metrics.render(), CONTENT_TYPE, method)
        elif logserver.matches(path) and method == "GET":
            await logserver.serve(self.logs, scope, receive, send)
        else:
            await _respond(
                send,
                404,
                b"not found: try /healthz, /readyz, /metrics or /logs/<task_id>/<attempt>\n",
                "text/plain",
                method,
            )

    async def _status(self, send: Send, method: str, reason: str | None) -> None:
        body: dict[str, object] = {
            "status": "ok" if reason is None else "unavailable",
            "agent_id": self.agent.agent_id,
            "pool": self.agent.pool,
        }
        if reason is not None:
            body["reason"] = reason
        code = 200 if reason is None else 503
        await _respond(send, code, _json.encode(body) + b"\n", "application/json", method)


async def _respond(send: Send, status: int, body: bytes, content_type: str, method: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the agent handles SIGTERM and SIGINT itself


class HealthServer:
    """Binds at construction (so a port in use is an error at start), serves in ``run``."""

    def __init__(self, app: HealthApp, port: int) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"REXEC_HEALTH_PORT must be 1-65535 (or 0 for none), not {port}")
        self.port = port
        self._socket = _bind(port)
        self._server = _Server(
            uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                lifespan="off",
                server_header=False,
                timeout_graceful_shutdown=STOP_TIMEOUT,
            )
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``stop``; on cancellation, close the listener before giving up."""
        task_status.started()
        try:
            await self._server.serve(sockets=[self._socket])
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_TIMEOUT):
                if self._server.started:
                    await self._server.shutdown(sockets=[self._socket])
            raise
        finally:
            self._socket.close()

    def stop(self) -> None:
        self._server.should_exit = True


def _bind(port: int) -> socket.socket:
    """Listen on every address: kubelet probes the pod's IP (IPv4, IPv6 or both)."""
    if socket.has_dualstack_ipv6():
        sock = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
        sock = socket.create_server(("0.0.0.0", port))
    sock.setblocking(False)
    return sock
