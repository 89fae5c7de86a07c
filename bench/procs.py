"""Worker processes the harness starts: spawn, signal a whole process tree, stop with deadlines.

Every process started here is registered, so :func:`stop_all` (called on exit, on SIGTERM and
on SIGINT by ``bench.run``) leaves nothing behind, also after an error.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

_LIVE: dict[int, ManagedProcess] = {}


class ManagedProcess:
    """One started process (and whatever children it forks), logging to a file."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        full_env = {**os.environ, **env}
        self.popen = subprocess.Popen(
            self.argv,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.stopped_by_signal = False
        _LIVE[self.pid] = self

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        """This process and all its descendants (parents first)."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def owns_pid(self, pid: int) -> bool:
        return any(p.pid == pid for p in self.tree())

    def signal_tree(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process and every descendant (as a node crash or hang would)."""
        procs = self.tree()
        if sig == signal.SIGCONT:
            procs = list(reversed(procs))
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        if sig == signal.SIGSTOP:
            self.stopped_by_signal = True
        elif sig == signal.SIGCONT:
            self.stopped_by_signal = False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGCONT (in case it was stopped), SIGTERM, then SIGKILL the tree after ``timeout``."""
        procs = self.tree()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _gone, alive = psutil.wait_procs(procs, timeout=timeout)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        self._log.close()
        _LIVE.pop(self.pid, None)

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_module(
    name: str, module: str, args: Sequence[str], env: Mapping[str, str], log_path: Path
) -> ManagedProcess:
    """Start ``python -m module args...`` with this interpreter."""
    return ManagedProcess(name, [sys.executable, "-m", module, *args], env, log_path)


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "condition"
) -> None:
    """Poll ``predicate()`` until it is true; raise TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def stop_all() -> None:
    for proc in list(_LIVE.values()):
        try:
            proc.stop(timeout=5)
        except Exception as exc:  # cleanup must go on for the others
            print(f"bench: could not stop {proc.name} (pid {proc.pid}): {exc}", file=sys.stderr)


atexit.register(stop_all)
