"""Importable task functions for tests: what an agent's child process runs."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any


def add(x: int, y: int) -> int:
    return x + y


async def async_add(x: int, y: int) -> int:
    await asyncio.sleep(0)
    return x + y


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def fail(message: str = "boom") -> None:
    raise RuntimeError(message)


def big_result(size: int) -> str:
    return "x" * size


def unserialisable() -> Any:
    return object()


def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


def crash() -> None:
    """The child process dies mid-task, as a segfault or an OOM kill would."""
    os.kill(os.getpid(), signal.SIGKILL)


def write_pid(path: str, seconds: float) -> int:
    """Record which process runs the task, then run for a while. The file appears whole
    (written aside, then renamed): a test that sees it can read the pid."""
    with open(f"{path}.part", "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(f"{path}.part", path)
    time.sleep(seconds)
    return os.getpid()


NOT_CALLABLE = 42


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def touch(path: str) -> None:
    """Leave a mark: a test asserts a forged task never got this far."""
    with open(path, "w") as handle:
        handle.write("ran")
