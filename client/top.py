"""What ``rexec top`` shows, without the drawing: one snapshot of the API and the rates between
snapshots. Kept apart from the CLI so the arithmetic is tested without a terminal."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from rexec.client import RexecClient, RexecError
from rexec.schemas.api import AgentView, PoolView, TaskState, TaskView

FAILED_STATES = (TaskState.FAILED.value, TaskState.TIMED_OUT.value)
RATE_WINDOW = 10.0
"""Seconds of history the per-second rates average over: steady, yet quick to follow a change."""
RUNNING_LIMIT = 500
"""Running tasks fetched per refresh, to show which task runs on which agent."""


@dataclass(frozen=True)
class Figures:
    """What the dispatcher's ``/metrics`` adds to the API: the broker's view and the trouble."""

    queue_depth: dict[str, float] = field(default_factory=dict)
    """Messages ready in ``rexec.pool.<pool>``, as the broker reports them."""
    agents_live: dict[str, float] = field(default_factory=dict)
    requeues: dict[str, float] = field(default_factory=dict)
    stale_events: dict[str, float] = field(default_factory=dict)
    dead_lettered: dict[str, float] = field(default_factory=dict)


def parse_figures(text: str) -> Figures:
    by_name: dict[str, tuple[str, dict[str, float]]] = {
        "rexec_queue_depth": ("pool", {}),
        "rexec_agents_live": ("pool", {}),
        "rexec_requeues_total": ("reason", {}),
        "rexec_stale_events_total": ("reason", {}),
        "rexec_dead_lettered_total": ("source", {}),
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            wanted = by_name.get(sample.name)
            if wanted is not None:
                label, values = wanted
                key = sample.labels.get(label, "")
                values[key] = values.get(key, 0.0) + sample.value
    return Figures(
        queue_depth=by_name["rexec_queue_depth"][1],
        agents_live=by_name["rexec_agents_live"][1],
        requeues=by_name["rexec_requeues_total"][1],
        stale_events=by_name["rexec_stale_events_total"][1],
        dead_lettered=by_name["rexec_dead_lettered_total"][1],
    )


@dataclass(frozen=True)
class Snapshot:
    at: float
    pools: Sequence[PoolView] = ()
    agents: Sequence[AgentView] = ()
    running: Sequence[TaskView] = ()
    recent: Sequence[TaskView] = ()
    figures: Figures | None = None
    """None when ``/metrics`` could not be read (the API answered, its metrics did not)."""
    error: str | None = None

    def running_on(self) -> dict[str, list[TaskView]]:
        """Running tasks by the agent that runs them, oldest first."""
        by_agent: dict[str, list[TaskView]] = {}
        for task in sorted(self.running, key=lambda t: t.started_at or t.created_at):
            if task.agent_id:
                by_agent.setdefault(task.agent_id, []).append(task)
        return by_agent


def take(client: RexecClient, pool: str | None, limit: int) -> Snapshot:
    """One consistent-enough look at the API; an unreachable API is a snapshot with an error."""
    now = time.time()
    try:
        pools = client.list_pools()
        agents = client.list_agents(pool=pool)
        running = client.list_tasks(pool=pool, state=TaskState.RUNNING.value, limit=RUNNING_LIMIT)
        recent = client.list_tasks(pool=pool, limit=limit)
    except RexecError as exc:
        return Snapshot(at=now, error=exc.message)
    if pool is not None:
        pools = [p for p in pools if p.name == pool]
    try:
        figures: Figures | None = parse_figures(client.metrics())
    except (RexecError, ValueError):
        figures = None
    return Snapshot(now, pools, agents, running, recent, figures)


@dataclass(frozen=True)
class PoolRates:
    succeeded: float
    failed: float
    """Tasks per second that ended failed or timed_out."""


class Rates:
    """Per-second completions of each pool, from its task counts over the last ``window``."""

    def __init__(
        self, window: float = RATE_WINDOW, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self.clock = clock
        self._history: deque[tuple[float, dict[str, Mapping[str, int]]]] = deque()

    def add(self, pools: Sequence[PoolView]) -> None:
        now = self.clock()
        self._history.append((now, {p.name: dict(p.tasks) for p in pools}))
        # Keep one sample at or beyond the window's start, so the window is always covered.
        while len(self._history) > 2 and now - self._history[1][0] >= self.window:
            self._history.popleft()

    def of(self, pool: str) -> PoolRates | None:
        """None until there are two samples of the pool to compare."""
        if len(self._history) < 2:
            return None
        (t0, first), (t1, last) = self._history[0], self._history[-1]
        if pool not in first or pool not in last or t1 <= t0:
            return None

        def rate(states: Sequence[str]) -> float:
            done = sum(last[pool].get(s, 0) - first[pool].get(s, 0) for s in states)
            return max(0.0, done / (t1 - t0))

        return PoolRates(rate([TaskState.SUCCEEDED.value]), rate(FAILED_STATES))
