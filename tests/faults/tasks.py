"""Task functions for fault tests: each leaves evidence a test can check from outside."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def slow_once(marker: str, seconds: float = 60.0) -> int:
    """The first attempt writes its pid to ``marker`` and runs long; later attempts are quick.

    A test can then tell the first attempt (which it disturbs) from the retry, and check that
    the first attempt's process was stopped.
    """
    path = Path(marker)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return 2
    with os.fdopen(fd, "w") as file:
        file.write(str(os.getpid()))
    time.sleep(seconds)
    return 1


def record(directory: str, name: str, seconds: float) -> str:
    """Sleep, then leave a file per execution, so runs of the same task can be counted."""
    time.sleep(seconds)
    Path(directory, f"{name}.{os.getpid()}.{time.monotonic_ns()}").touch()
    return name


def record_after_a_long_first(directory: str, name: str, seconds: float) -> str:
    """``record``, but the first execution of ``name`` runs a minute first (it leaves
    ``name.first``): long enough that a test's fault always lands while it runs."""
    try:
        Path(directory, f"{name}.first").touch(exist_ok=False)
    except FileExistsError:
        pass
    else:
        time.sleep(60)
    return record(directory, name, seconds)


def kill_agent() -> None:
    """A poison task: it kills the agent running it (the child's parent), every time."""
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(30)


def hold(release: str, timeout: float = 60.0) -> str:
    """Run until the test creates ``release`` (or ``timeout`` passes): a task as long as the
    test needs, without guessing a duration."""
    deadline = time.monotonic() + timeout
    while not Path(release).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} was not created within {timeout}s")
        time.sleep(0.05)
    return "released"


LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    execution TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started REAL NOT NULL,
    finished REAL
)
"""


def ledger(path: str, key: str, seconds: float) -> str:
    """Record this execution of the task ``key`` in the SQLite ledger at ``path`` when it starts
    and when it ends, sleeping ``seconds`` between; return the execution's id. The ledger is
    the soak's outside view of what ran, and how often, whatever the plane believes."""
    import sqlite3
    import uuid

    execution = uuid.uuid4().hex
    with sqlite3.connect(path, timeout=60) as db:
        db.execute(
            "INSERT INTO executions (execution, key, pid, started) VALUES (?, ?, ?, ?)",
            (execution, key, os.getpid(), time.time()),
        )
    time.sleep(seconds)
    with sqlite3.connect(path, timeout=60) as db:
        db.execute(
            "UPDATE executions SET finished = ? WHERE execution = ?", (time.time(), execution)
        )
    return execution
