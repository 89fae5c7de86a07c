"""A task that starts processes which try to escape: a child in a session of its own and a
double-forked daemon (reparented away from its parent), as Airflow's task runner and daemons do.

Used as a function task (``tests.worker.spawner:spawn``) and as a command
(``python -m tests.worker.spawner PIDFILE``). Every pid it starts (and its own) is appended to
``pidfile``; the line ``ready`` follows once all of them are recorded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def _record(pidfile: str, line: str) -> None:
    with open(pidfile, "a") as file:
        file.write(line + "\n")


def spawn(pidfile: str, seconds: float = 300.0) -> None:
    _record(pidfile, str(os.getpid()))
    own_session = subprocess.Popen(["sleep", str(seconds)], start_new_session=True)
    _record(pidfile, str(own_session.pid))
    first = os.fork()
    if first == 0:  # double fork: the daemon's parent exits, so it is reparented
        try:
            os.setsid()
            if os.fork() == 0:
                _record(pidfile, str(os.getpid()))
                time.sleep(seconds)
        finally:
            os._exit(0)
    os.waitpid(first, 0)
    deadline = time.monotonic() + 10
    while Path(pidfile).read_text().count("\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # the daemon writes its pid on its own time
    _record(pidfile, "ready")
    time.sleep(seconds)


def pids(pidfile: str) -> list[int] | None:
    """The recorded pids once the spawner said ``ready``, else None."""
    try:
        lines = Path(pidfile).read_text().split()
    except FileNotFoundError:
        return None
    return [int(p) for p in lines if p.isdigit()] if "ready" in lines else None


if __name__ == "__main__":
    spawn(sys.argv[1])
