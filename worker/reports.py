"""Builds the events an agent reports: every one carries (task, attempt, agent) for fencing.

Every event leaves the agent through here, so this is where resolved secret values are masked:
in results, error types, messages and tracebacks (command output tails included).
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

import msgspec

from rexec.schemas import messages

from .secrets.masking import Masker

E = TypeVar("E", bound=messages.TaskEvent)


class Reporter:
    """Stamps events with this agent's id and the current time, and masks secret values."""

    def __init__(self, agent_id: str, masker: Masker | None = None) -> None:
        self.agent_id = agent_id
        self.masker = masker if masker is not None else Masker()

    def event(self, kind: type[E], task: messages.TaskMessage, **fields: Any) -> E:
        if len(self.masker):
            fields = {name: self._mask(value) for name, value in fields.items()}
        return kind(
            task_id=task.task_id,
            attempt=task.attempt,
            agent_id=self.agent_id,
            at=time.time(),
            **fields,
        )

    def _mask(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.masker.mask(value)
        if isinstance(value, msgspec.Raw):
            return msgspec.Raw(self.masker.mask_json(bytes(value)))
        if value is None or isinstance(value, bool | int | float):
            return value
        # Any other result: mask its JSON form.
        return msgspec.Raw(self.masker.mask_json(msgspec.json.encode(value)))

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
