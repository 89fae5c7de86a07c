"""The attempts this agent holds and runs right now, so control messages, lease checks and the
drain can stop one: stopping cancels the attempt's scope, and the runner kills its process.
Why an attempt stops (``StopReason``) and how it ended (``Outcome``) live here too."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import anyio

from rexec.schemas import messages
from rexec.schemas.messages import TaskMessage


class StopReason(enum.StrEnum):
    CANCEL = "cancel"
    """The user cancelled the task: report ``cancelled``."""
    LEASE_LOST = "lease_lost"
    """Another agent holds the attempt now: report nothing, it is not ours any more."""
    SHUTDOWN = "shutdown"
    """The agent drains and the attempt did not finish in time: hand it back (retryable)."""


class Outcome(enum.StrEnum):
    """How a delivery ended on this agent: the ``outcome`` label and ``rexec.outcome``."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    NOT_ALLOWED = "not_allowed"
    DEAD_LETTERED = "dead_lettered"
    DUPLICATE = "duplicate"
    HANDED_BACK = "handed_back"
    LEASE_LOST = "lease_lost"
    """Another agent took the attempt over; counted by ``rexec_agent_leases_lost_total``."""


def attempt_outcome(event: messages.TaskEvent | None, reason: StopReason | None) -> Outcome:
    """The outcome of an attempt that ran, from its terminal event (None: lease lost)."""
    if isinstance(event, messages.Succeeded):
        return Outcome.SUCCEEDED
    if isinstance(event, messages.TimedOut):
        return Outcome.TIMED_OUT
    if isinstance(event, messages.Cancelled):
        return Outcome.CANCELLED
    if isinstance(event, messages.Failed):
        if reason is StopReason.SHUTDOWN and event.error_type == messages.AGENT_SHUTDOWN:
            return Outcome.HANDED_BACK  # stopped at the drain deadline, retried elsewhere
        return Outcome.FAILED
    return Outcome.LEASE_LOST


@dataclass(eq=False)
class Attempt:
    task: TaskMessage
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stop_reason: StopReason | None = None
    started_at: float = 0.0

    @property
    def key(self) -> tuple[str, int]:
        return (self.task.task_id, self.task.attempt)

    def stop(self, reason: StopReason) -> bool:
        """Ask the attempt to stop; the first reason wins. False if already stopping."""
        if self.stop_reason is not None:
            return False
        self.stop_reason = reason
        self.scope.cancel()
        return True


class Attempts:
    """Running attempts by (task id, attempt), and the leases this agent holds."""

    def __init__(self) -> None:
        self._running: dict[tuple[str, int], Attempt] = {}
        self.held: set[tuple[str, int]] = set()
        """Attempts whose lease this agent claimed and has not released: the heartbeat
        re-asserts them, so they outlive a Redis that lost its data."""

    def __len__(self) -> int:
        return len(self._running)

    def add(self, attempt: Attempt) -> None:
        self._running[attempt.key] = attempt

    def remove(self, attempt: Attempt) -> None:
        if self._running.get(attempt.key) is attempt:
            del self._running[attempt.key]

    def get(self, task_id: str, attempt: int) -> Attempt | None:
        return self._running.get((task_id, attempt))

    def all(self) -> list[Attempt]:
        return list(self._running.values())

    def lease_lost(self, task_id: str, attempt: int) -> bool:
        """Another agent holds the attempt now: forget its lease, stop it if it runs.
        True if a running attempt was stopped by this."""
        self.held.discard((task_id, attempt))
        running = self.get(task_id, attempt)
        return running is not None and running.stop(StopReason.LEASE_LOST)
