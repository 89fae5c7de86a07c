"""A mixed workload for fault tests: agents to run it, tasks that leave evidence, checks."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from rexec.client import RexecClient, RexecError
from rexec.schemas.api import SubmitTask, TaskState, TaskView
from tests.conftest import BOOTSTRAP_KEY
from tests.e2e.conftest import Plane
from tests.faults.conftest import ALLOW, assert_each_terminal_once
from tests.support import wait_until

RECORD = "tests.faults.tasks:record"
SLEEP = "tests.tasks:sleep"


def online(plane: Plane, pool: str, count: int) -> None:
    wait_until(
        lambda: sum(a.state == "online" for a in plane.client.list_agents(pool=pool)) >= count,
        30,
        f"{count} agent(s) online in {pool}",
    )


def start_agents(plane: Plane, pool: str, count: int, concurrency: int) -> None:
    plane.client.create_pool(pool)
    for i in range(count):
        plane.start_agent(pool, "--concurrency", str(concurrency), *ALLOW, name=f"agent{i}")
    online(plane, pool, count)


def submit_mix(plane: Plane, pool: str, runs: Path, prefix: str, count: int) -> dict[str, str]:
    """``count`` tasks of mixed duration, two in three ``record`` (their name is their result).

    Returns task id -> the name a ``record`` task leaves in ``runs`` ('' for a ``sleep``).
    """
    durations = itertools.cycle([0.05, 0.3, 0.1, 1.0, 0.2, 0.6])
    bodies: list[SubmitTask] = []
    names: list[str] = []
    for i in range(count):
        seconds = next(durations)
        if i % 3 == 2:
            bodies.append(SubmitTask(pool=pool, target=SLEEP, args=[seconds]))
            names.append("")
        else:
            name = f"{prefix}{i}"
            bodies.append(SubmitTask(pool=pool, target=RECORD, args=[str(runs), name, seconds]))
            names.append(name)
    ids = plane.client.submit_many(bodies)
    return dict(zip(ids, names, strict=True))


def executions(runs: Path) -> Counter[str]:
    """How many times each ``record`` task ran to its end (one file per execution)."""
    return Counter(path.name.split(".")[0] for path in runs.iterdir())


def states(plane: Plane, pool: str) -> Counter[TaskState]:
    return Counter(t.state for t in plane.client.list_tasks(pool=pool, limit=1000))


def assert_all_succeeded_once(plane: Plane, tasks: dict[str, str], done: list[TaskView]) -> None:
    assert len(done) == len(tasks), "every task is known"
    not_ok = [(t.id, t.state, t.error) for t in done if t.state is not TaskState.SUCCEEDED]
    assert not not_ok, f"{len(not_ok)} task(s) did not succeed: {not_ok[:5]}"
    wrong = [t.id for t in done if tasks[t.id] and t.result != tasks[t.id]]
    assert not wrong, f"tasks with the wrong result: {wrong[:5]}"
    assert_each_terminal_once(plane, done)


@dataclass(frozen=True)
class Refusal:
    """A submit the API did not accept: its HTTP status (None: no answer) and message."""

    at: float
    status: int | None
    message: str


class SteadySubmitter:
    """Submits one short ``record`` task every ``every`` seconds from a thread of its own (as
    a client under a fault keeps doing), noting which submits were accepted and how the
    others were refused. ``accepted`` maps task id -> the name its executions leave in
    ``runs``."""

    def __init__(self, plane: Plane, pool: str, runs: Path, every: float = 0.05) -> None:
        self.client = RexecClient(
            plane.settings.api_url, api_key=plane.settings.api_key or BOOTSTRAP_KEY
        )
        self.pool, self.runs, self.every = pool, runs, every
        self.accepted: dict[str, str] = {}
        self.refusals: list[Refusal] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-submits", daemon=True)

    def __enter__(self) -> SteadySubmitter:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopped.set()
        self._thread.join(60)
        self.client.close()

    def _run(self) -> None:
        for i in itertools.count():
            if self._stopped.wait(self.every):  # the load's pace, not a wait for a condition
                return
            name = f"steady{i}"
            try:
                task = self.client.submit(self.pool, RECORD, args=[str(self.runs), name, 0.05])
            except RexecError as exc:
                self.refusals.append(Refusal(time.monotonic(), exc.status, exc.message))
                continue
            self.accepted[task.id] = name

    def accepted_more(self, than: int) -> bool:
        return len(self.accepted) > than
