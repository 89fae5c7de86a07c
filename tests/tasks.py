"""Importable task functions for tests: what an agent's child process runs."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

from rexec.worker.context import NonRetryable


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


class Refused(NonRetryable):
    """A failure no further attempt can fix."""


def refuse(message: str = "refused") -> None:
    raise Refused(message)


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


def chatty(name: str, lines: int = 3) -> str:
    """Writes to stdout, stderr (also from a subprocess) and logging: a task log's raw material."""
    import logging
    import subprocess
    import sys

    for i in range(lines):
        print(f"out {name} {i}")
    print(f"err {name}", file=sys.stderr)
    logging.getLogger("tests.chatty").info("logged %s", name)
    logging.getLogger("tests.chatty").warning("warned %s", name)
    subprocess.run(["sh", "-c", f"echo sub-out {name}; echo sub-err {name} >&2"], check=True)
    print("no newline at the end", end="")
    return name


def chatty_fail(name: str) -> None:
    print(f"about to fail {name}")
    raise ValueError(f"failed {name}")


def flood(lines: int) -> int:
    """More output than a pipe holds, from Python and from a subprocess."""
    import subprocess

    for i in range(lines):
        print(f"flood line {i:06d} " + "x" * 80)
    subprocess.run(["sh", "-c", f"seq 1 {lines}"], check=True)
    return lines


def imported(module: str) -> bool:
    """Whether ``module`` was imported in this child before this call."""
    return module in sys.modules
