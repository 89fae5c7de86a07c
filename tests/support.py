"""Helpers for tests: waiting on conditions with deadlines, and running rexec processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar

import anyio
import httpx

from rexec.schemas.signing import Signer, generate_private_key

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent

SIGNING_KEY = generate_private_key()
"""This test process's orchestration-plane key: dispatchers the tests start sign with it and
in-process agents trust it (each xdist worker makes its own)."""
SIGNER = Signer(SIGNING_KEY)


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def await_until(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109  (a deadline for polling, not a cancel scope)
    what: str = "condition",
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await anyio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A rexec process started by a test; its output goes to a log file shown on failure."""

    def __init__(
        self, argv: list[str], env: Mapping[str, str], log: Path, cwd: Path = REPO
    ) -> None:
        self.argv = argv
        self.log = log
        self._log_file = log.open("wb")
        self.popen = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; always reaps the whole process group."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGCONT)
                self.popen.terminate()
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        code = self.popen.wait()
        self._log_file.close()
        return code


def python_entry(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def http_ready(url: str, ca_file: str = "") -> bool:
    verify = ssl.create_default_context(cafile=ca_file) if ca_file else True
    try:
        return httpx.get(url, timeout=1.0, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False
