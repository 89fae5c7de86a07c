"""Linux primitives to stop a process tree whole, even one whose members left its process group.

An attempt's processes may call setsid or double-fork (Airflow's task runner does), so neither
a process group nor a session holds them all. A *child subreaper* (``PR_SET_CHILD_SUBREAPER``)
inherits every orphan below it, so its descendants in ``/proc`` are exactly what it started;
``PR_SET_PDEATHSIG`` tells it when the agent dies, since a SIGKILLed agent can clean up nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

DEFAULT_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL when nobody configured one (``REXEC_KILL_GRACE``)."""


_GIVE_UP_AFTER = 5.0
"""Seconds past the SIGKILL to wait for the tree to disappear before giving up on it."""


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def set_parent_death_signal(sig: int) -> bool:
    """Have the kernel send ``sig`` when our parent dies. Check the parent afterwards: it may
    have died before this call, and then no signal comes."""
    return _prctl(PR_SET_PDEATHSIG, sig)


def become_subreaper() -> bool:
    """Orphans below us are reparented to us rather than to init, so we can find and stop them."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _table() -> dict[int, list[tuple[int, bool]]]:
    """``ppid -> [(pid, zombie)]`` for every process now."""
    table: dict[int, list[tuple[int, bool]]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as file:
                fields = file.read().rpartition(b")")[2].split()
        except OSError:  # it exited meanwhile
            continue
        table.setdefault(int(fields[1]), []).append((int(name), fields[0] == b"Z"))
    return table


def descendants(root: int | None = None) -> list[tuple[int, bool]]:
    """``(pid, zombie)`` of every process below ``root`` (default: this process)."""
    table = _table()
    found: list[tuple[int, bool]] = []
    pending = [os.getpid() if root is None else root]
    while pending:
        for pid, zombie in table.get(pending.pop(), ()):
            found.append((pid, zombie))
            pending.append(pid)
    return found


def reap() -> bool:
    """Reap our exited children; True while we still have any (live or not yet exited)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and what is below it now, without waiting: the agent's last resort."""
    _signal_all([root, *(pid for pid, zombie in descendants(root) if not zombie)], signal.SIGKILL)


def terminate_descendants(grace: float, root: int | None = None) -> int:
    """SIGTERM everything below ``root`` (default: us), SIGKILL what is left after ``grace``
    seconds, and return once nothing is left, reaping what we inherited. Returns how many
    processes got SIGTERM.

    New processes forked meanwhile get SIGTERM too, then SIGKILL. ``root`` other than us is a
    last resort (its orphans then go to init, which reaps them itself)."""
    mine = root is None
    if mine and not reap():  # fast path: a subreaper without children has no descendants
        return 0
    termed: set[int] = set()
    deadline = time.monotonic() + grace
    delay = 0.005
    while True:
        living = [pid for pid, zombie in descendants(root) if not zombie]
        if mine:
            reap()
        if not living and not (mine and descendants()):
            return len(termed)
        if time.monotonic() >= deadline + _GIVE_UP_AFTER:  # stuck in the kernel (state D)
            return len(termed)
        if time.monotonic() >= deadline:
            _signal_all(living, signal.SIGKILL)
        else:
            fresh = [pid for pid in living if pid not in termed]
            _signal_all(fresh, signal.SIGTERM)
            _signal_all(fresh, signal.SIGCONT)  # a stopped process would not act on it
            termed.update(fresh)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
