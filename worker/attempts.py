"""The attempts this agent runs right now, so control messages, lease checks and the drain can
stop one: stopping cancels the attempt's scope, and the runner kills its process."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import anyio

from rexec.schemas.messages import TaskMessage


class StopReason(enum.StrEnum):
    CANCEL = "cancel"
    """The user cancelled the task: report ``cancelled``."""
    LEASE_LOST = "lease_lost"
    """Another agent holds the attempt now: report nothing, it is not ours any more."""
    SHUTDOWN = "shutdown"
    """The agent drains and the attempt did not finish in time: hand it back (retryable)."""


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
    """Running attempts by (task id, attempt)."""

    def __init__(self) -> None:
        self._running: dict[tuple[str, int], Attempt] = {}

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
