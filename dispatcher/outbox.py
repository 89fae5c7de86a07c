"""An outbox row as the dispatcher publishes it, and the task message it becomes.

The relay reads due rows (``Due``, selected with ``DUE_COLUMNS``); a submit builds its new
task's row with ``Due.first_attempt`` and hands it to the direct publisher (``direct.py``);
both turn a row into a ``TaskMessage`` with ``task_message``. The runtime only names ``Due``
(``NewTaskPublisher.offer``), so this module imports neither the relay nor the runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import msgspec

from rexec.schemas import messages
from rexec.schemas.api import TaskState

from .db.models import Outbox, Task

_json = msgspec.json.Decoder()


class Messaged(Protocol):
    """The columns of a task its message carries (an ORM ``Task`` or a ``Due`` row)."""

    @property
    def id(self) -> str: ...
    @property
    def pool(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def argv_json(self) -> str: ...
    @property
    def args_json(self) -> str: ...
    @property
    def kwargs_json(self) -> str: ...
    @property
    def secrets_json(self) -> str | None: ...
    @property
    def final_exit_codes_json(self) -> str | None: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def expires_at(self) -> float | None: ...
    @property
    def created_at(self) -> float: ...


def task_message(task: Messaged, attempt: int) -> messages.TaskMessage:
    return messages.TaskMessage(
        task_id=task.id,
        attempt=attempt,
        pool=task.pool,
        kind="command" if task.kind == "command" else "function",
        target=task.target,
        argv=_json.decode(task.argv_json),
        args=_json.decode(task.args_json),
        kwargs=_json.decode(task.kwargs_json),
        timeout=task.timeout,
        expires_at=task.expires_at,
        submitted_at=task.created_at,
        secrets=_json.decode(task.secrets_json or "[]"),
        final_exit_codes=_json.decode(task.final_exit_codes_json or "[]"),
    )


class Due(NamedTuple):
    """A due outbox row with its task's columns: what the relay needs, read as a plain row
    (ORM entities cost more CPU to build than the relay spends on everything else)."""

    outbox_id: int
    attempt: int
    """The outbox row's attempt: the one to publish."""
    state: str
    task_attempt: int
    """The task's current attempt: a row of an earlier one is stale."""
    id: str
    pool: str
    kind: str
    target: str
    argv_json: str
    args_json: str
    kwargs_json: str
    secrets_json: str | None
    final_exit_codes_json: str | None
    timeout: float | None
    expires_at: float | None
    created_at: float
    trace_parent: str | None

    @property
    def live(self) -> bool:
        return self.state == TaskState.QUEUED and self.task_attempt == self.attempt

    @classmethod
    def first_attempt(cls, task: Mapping[str, Any], outbox_id: int) -> Due:
        """A new task's first attempt, from the column values its submit inserted (the fields
        after the four outbox ones are the task's columns, by name)."""
        columns = (task[name] for name in cls._fields[4:])
        return cls(outbox_id, 1, task["state"], 1, *columns)


DUE_COLUMNS = (
    Outbox.id,
    Outbox.attempt,
    Task.state,
    Task.attempt,
    Task.id,
    Task.pool,
    Task.kind,
    Task.target,
    Task.argv_json,
    Task.args_json,
    Task.kwargs_json,
    Task.secrets_json,
    Task.final_exit_codes_json,
    Task.timeout,
    Task.expires_at,
    Task.created_at,
    Task.trace_parent,
)
"""The columns a ``Due`` row is selected with, in the order of its fields (``Due._make``)."""
