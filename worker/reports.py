"""Builds the events an agent reports: every one carries (task, attempt, agent) for fencing."""

from __future__ import annotations

import time
from typing import Any, TypeVar

from schemas import messages

E = TypeVar("E", bound=messages.TaskEvent)


class Reporter:
    """Stamps events with this agent's id and the current time."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id

    def event(self, kind: type[E], task: messages.TaskMessage, **fields: Any) -> E:
        return kind(
            task_id=task.task_id,
            attempt=task.attempt,
            agent_id=self.agent_id,
            at=time.time(),
            **fields,
        )

    def failed(
        self,
        task: messages.TaskMessage,
        error_type: str,
        message: str,
        *,
        retryable: bool,
        traceback: str = "",
        **fields: Any,
    ) -> messages.Failed:
        return self.event(
            messages.Failed,
            task,
            error_type=error_type,
            message=message,
            traceback=traceback,
            retryable=retryable,
            **fields,
        )
