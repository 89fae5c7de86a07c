"""A read deadline for the API's HTTP connections, against slow clients (slowloris).

uvicorn (0.55) times out only the idle gap between requests (``timeout_keep_alive``): a
connection that never sends a whole request, or dribbles its headers or body a byte at a
time, holds its socket forever. ``ReadTimeoutH11Protocol`` gives each request a deadline
for arriving in full, counted from the connection's opening or the request's first byte.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

log = logging.getLogger("rexec.serve")

REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 20\r\n"
    b"connection: close\r\n\r\n"
    b"Request read timeout"
)

_RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)
"""The client's h11 states in which its request is all in: nothing left to wait for."""


class ReadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request is not in within
    ``read_timeout`` seconds (with a 408 when its headers are not)."""

    read_timeout: float = 30.0
    """Set per server by ``protocol_class``."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte is cut off too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()  # a pipelined request may be half in already

    def _watch(self) -> None:
        """Arm the deadline while a request is partly in; drop it once it is all in."""
        state = self.conn.their_state
        if state in _RECEIVED:
            self._disarm()
        elif state is h11.SEND_BODY or self.conn.trailing_data[0]:
            self._arm()
        # Otherwise idle between requests: uvicorn's keep-alive timeout closes it.

    def _arm(self) -> None:
        if self._read_deadline is None:
            self._read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # closed already, or upgraded to another protocol
        log.debug(  # not info: a slowloris flood would flood the log too
            "closing a slow client's connection: its request was not in within the read timeout",
            extra={
                "client": "{}:{}".format(*self.client) if self.client else "",
                "seconds": self.read_timeout,
            },
        )
        if self.conn.their_state is h11.IDLE:  # headers not in: nothing answered it yet
            self.transport.write(REQUEST_TIMEOUT_RESPONSE)
        self.transport.close()  # connection_lost tells a running request it is disconnected


def protocol_class(read_timeout: float) -> type[ReadTimeoutH11Protocol]:
    """The protocol class for one server: uvicorn takes a class, not an instance."""
    return type("ReadTimeoutH11Protocol", (ReadTimeoutH11Protocol,), {"read_timeout": read_timeout})
