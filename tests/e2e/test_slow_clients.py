"""Slow clients (slowloris) against a real ``rexec serve``: cut off at the read timeout, and
never in the way of a normal request meanwhile."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rexec.schemas.settings import Settings
from tests.e2e.conftest import Plane
from tests.support import wait_until

READ_TIMEOUT = 2.0
MARGIN = 5.0
SLOW = 200
MAX_CONNECTIONS = 50
DRIBBLE_EVERY = 0.3
"""Seconds between the bytes a dribbling client sends: well inside the read timeout, so only
a deadline on the whole request (not one on idleness) cuts it off."""

PARTIAL = (
    b"",  # connects and says nothing
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",  # headers, a byte now and then
    b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{",  # body, likewise
)


@pytest.fixture
def slow_plane(settings: Settings, tmp_path: Path) -> Iterator[Plane]:
    """A plane with a short read timeout, so the test sees the server cut clients off."""
    plane = Plane(settings, tmp_path, {"REXEC_API_READ_TIMEOUT": str(READ_TIMEOUT)})
    yield plane
    plane.close()


@pytest.fixture
def capped_plane(settings: Settings, tmp_path: Path) -> Iterator[Plane]:
    """A plane with a short read timeout and a small connection limit."""
    env = {
        "REXEC_API_READ_TIMEOUT": str(READ_TIMEOUT),
        "REXEC_API_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }
    plane = Plane(settings, tmp_path, env)
    yield plane
    plane.close()


class SlowClients:
    """``count`` raw connections, each stuck in a partial request, some dribbling bytes."""

    def __init__(self, port: int, count: int, kinds: tuple[bytes, ...] = PARTIAL) -> None:
        self.socks: list[socket.socket] = []
        self.opened: dict[socket.socket, float] = {}
        self.closed: dict[socket.socket, float] = {}
        self._kinds = kinds
        self._stop = threading.Event()
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            self.socks.append(sock)
            self.opened[sock] = time.monotonic()
            sock.sendall(kinds[i % len(kinds)])
            sock.setblocking(False)
        self._dribbler = threading.Thread(target=self._dribble, daemon=True)
        self._dribbler.start()

    def _dribble(self) -> None:
        """Keep the header and body clients busy: each byte would reset an idle timer."""
        while not self._stop.wait(DRIBBLE_EVERY):
            for i, sock in enumerate(self.socks):
                if self._kinds[i % len(self._kinds)] and sock not in self.closed:
                    with contextlib.suppress(OSError):  # closed by the server: poll() sees it
                        sock.send(b"a")

    def poll(self) -> int:
        """Record the connections the server has closed; return how many are still open."""
        for sock in self.socks:
            if sock in self.closed:
                continue
            try:
                while sock.recv(4096):  # a 408 before the close, if the server sends one
                    pass
            except BlockingIOError:
                continue
            except OSError:
                pass  # reset: closed too
            self.closed[sock] = time.monotonic()
        return len(self.socks) - len(self.closed)

    def lifetimes(self) -> list[float]:
        return sorted(self.closed[s] - self.opened[s] for s in self.closed)

    def close(self) -> None:
        self._stop.set()
        self._dribbler.join(5)
        for sock in self.socks:
            sock.close()


def test_slow_clients_are_cut_off_and_do_not_block_others(slow_plane: Plane) -> None:
    port = slow_plane.settings.api_port
    slow = SlowClients(port, SLOW)
    try:
        started = time.monotonic()
        health = httpx.get(f"{slow_plane.settings.api_url}/healthz", timeout=10)
        health_seconds = time.monotonic() - started
        started = time.monotonic()
        slow_plane.client.list_pools()  # authenticated, through the database
        authed_seconds = time.monotonic() - started
        print(
            f"\nwith {SLOW} slow connections open: GET /healthz {health_seconds:.3f}s, "
            f"authenticated GET /v1/pools {authed_seconds:.3f}s"
        )
        assert health.status_code == 200
        assert health_seconds < 2 and authed_seconds < 2
        assert slow.poll() == SLOW, "a slow connection was closed at once"

        wait_until(
            lambda: slow.poll() == 0,
            READ_TIMEOUT + MARGIN,
            f"the server to close {SLOW} slow connections",
        )
        lifetimes = slow.lifetimes()
        print(
            f"slow connections closed after {lifetimes[0]:.2f}s to {lifetimes[-1]:.2f}s "
            f"(read timeout {READ_TIMEOUT}s)"
        )
        assert lifetimes[0] >= READ_TIMEOUT * 0.9, "closed before the read timeout"
        # The server is still fine afterwards.
        assert httpx.get(f"{slow_plane.settings.api_url}/healthz", timeout=5).status_code == 200
    finally:
        slow.close()


def test_connection_limit_sheds_load_until_slow_clients_are_cut_off(capped_plane: Plane) -> None:
    """Past the limit a request gets a prompt 503, not a hang; the read timeout frees the
    slow connections holding the limit, and requests are served again."""
    url = f"{capped_plane.settings.api_url}/healthz"
    # No bodies: the server answers those 503 at once (the limit) and closes them.
    slow = SlowClients(capped_plane.settings.api_port, MAX_CONNECTIONS + 10, PARTIAL[:2])
    try:
        started = time.monotonic()
        over = httpx.get(url, timeout=10)
        assert over.status_code == 503
        assert time.monotonic() - started < 2
        wait_until(
            lambda: httpx.get(url, timeout=5).status_code == 200,
            READ_TIMEOUT + MARGIN,
            "the API to serve again once the slow connections are cut off",
        )
    finally:
        slow.close()


def _response(sock: socket.socket) -> bytes:
    """One response, headers and ``content-length`` body, read whole."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = int(head.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0)
            if len(body) >= length:
                assert len(body) == length, "more than one response"
                return data
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk


def test_read_timeout_spares_served_keep_alive_connections(slow_plane: Plane) -> None:
    """The deadline is per request: a keep-alive connection whose requests come in whole is
    not cut off at the read timeout, and a stalled request gets a 408 before the close."""
    port = slow_plane.settings.api_port
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as kept:
        kept.sendall(request)
        assert _response(kept).startswith(b"HTTP/1.1 200")
        stalled = SlowClients(port, 2, PARTIAL[:2])  # an idle one, a half-sent header
        try:
            # The stalled ones closing is the clock: the read timeout has passed.
            wait_until(lambda: stalled.poll() == 0, READ_TIMEOUT + MARGIN, "the stalled ones")
        finally:
            stalled.close()
        kept.sendall(request)
        assert _response(kept).startswith(b"HTTP/1.1 200")

    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + MARGIN) as half:
        half.sendall(PARTIAL[1])
        assert _response(half).startswith(b"HTTP/1.1 408")
