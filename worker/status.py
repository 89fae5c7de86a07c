"""What the agent tells its health server and its metrics: counts and a status protocol, so
neither reads the agent's internals (and neither imports ``agent.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .attempts import Outcome


@dataclass
class AgentStats:
    """Counters for tests and logs: what happened to the deliveries this agent received."""

    deliveries: int = 0
    """Messages taken from the pool queue (a batch carries several tasks)."""
    received: int = 0
    """Tasks those messages carried."""
    dead_lettered: int = 0
    expired: int = 0
    not_allowed: int = 0
    duplicates: int = 0
    cancelled_before_start: int = 0
    started: int = 0
    finished: int = 0
    leases_lost: int = 0
    handed_back: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    """Attempts cancelled while running (``cancelled_before_start``: before they started)."""
    stopped_at_drain: int = 0
    """Running attempts stopped at the drain deadline and reported back for a retry."""

    def ran(self, outcome: Outcome) -> None:
        """Count how an attempt that ran ended (a lost lease is counted where it is found)."""
        if outcome is Outcome.SUCCEEDED:
            self.succeeded += 1
        elif outcome is Outcome.FAILED:
            self.failed += 1
        elif outcome is Outcome.TIMED_OUT:
            self.timed_out += 1
        elif outcome is Outcome.CANCELLED:
            self.cancelled += 1
        elif outcome is Outcome.HANDED_BACK:
            self.stopped_at_drain += 1


@dataclass(frozen=True)
class Counters:
    """What the agent's parts count: its event publisher and its heartbeat."""

    event_batches: int = 0
    events: int = 0
    heartbeat_failures: int = 0


class AgentStatus(Protocol):
    """The agent as its health server and its metrics see it."""

    @property
    def agent_id(self) -> str: ...

    @property
    def pool(self) -> str: ...

    @property
    def concurrency(self) -> int: ...

    @property
    def running(self) -> int: ...

    @property
    def stats(self) -> AgentStats: ...

    def liveness(self) -> str | None:
        """Why the agent should be restarted (None: it is alive)."""
        ...

    def readiness(self) -> str | None:
        """Why the agent cannot take tasks now (None: ready)."""
        ...

    def counters(self) -> Counters: ...
