"""One attempt's log capture: opens the attempt's log, takes its output, closes it at the end.

A broken log store (disk full, bucket gone) must never fail or change the attempt: write errors
are logged once and the attempt runs on without a log (its event then carries no ``log_ref``).
"""

from __future__ import annotations

import contextlib
import logging

import anyio

from rexec.schemas import messages

from .logstore import AttemptLog, LogStore, Mask

log = logging.getLogger("rexec.agent.logs")


class AttemptCapture:
    def __init__(self, store: LogStore | None, task: messages.TaskMessage, mask: Mask | None):
        self.task = task
        self._store = store
        self._log: AttemptLog | None = None
        if store is None:
            return
        try:
            self._log = store.open(task.pool, task.task_id, task.attempt, mask)
        except (OSError, ValueError) as exc:
            self._failed("cannot open the attempt's log", exc)

    def sink(self, stream: str, text: str) -> None:
        if self._log is None:
            return
        try:
            self._log.write(stream, text)
        except (OSError, ValueError) as exc:
            self._failed("cannot write the attempt's log", exc)

    def end(self, event: messages.TaskEvent | None) -> None:
        """The agent's last line: how the attempt ended. An attempt that printed nothing and
        succeeded gets none, and so keeps no log."""
        if isinstance(event, messages.Succeeded) and not (self._log and self._log.created):
            return
        self.note(ending_note(event))

    def note(self, text: str) -> None:
        if self._log is None:
            return
        try:
            self._log.note(text)
        except (OSError, ValueError) as exc:
            self._failed("cannot write the attempt's log", exc)

    def close_now(self) -> None:
        """Close without uploading (the attempt's task was torn down)."""
        if self._log is not None and not self._log.closed:
            try:
                self._log.close()
            except OSError as exc:
                self._failed("cannot close the attempt's log", exc)

    async def finish(self) -> tuple[str, str]:
        """Close the log and hand it to the store; ``(log_tail, log_ref)`` for the event
        (empty: the attempt kept no log)."""
        current = self._log
        if current is None or self._store is None:
            return "", ""
        try:
            tail = current.close()
        except OSError as exc:
            self._failed("cannot close the attempt's log", exc)
            return "", ""
        store, task = self._store, self.task
        if not current.created:
            store.finish(task.pool, task.task_id, task.attempt)  # nothing to upload
            return "", ""
        if store.uploads:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(store.finish, task.pool, task.task_id, task.attempt)
        else:
            store.finish(task.pool, task.task_id, task.attempt)
        return tail, current.ref

    def _failed(self, what: str, exc: Exception) -> None:
        log.error(
            f"{what}: the attempt runs on without one",
            extra={"task_id": self.task.task_id, "attempt": self.task.attempt, "error": str(exc)},
        )
        if self._log is not None and not self._log.closed:
            with contextlib.suppress(OSError):
                self._log.close()
        self._log = None


def ending_note(event: messages.TaskEvent | None) -> str:
    """The agent's own last line(s) in the attempt's log: how the attempt ended."""
    if event is None:
        return "attempt stopped: its lease was taken over by another agent, which reports it"
    if isinstance(event, messages.Succeeded):
        return "attempt succeeded"
    if isinstance(event, messages.TimedOut):
        return f"attempt timed out after {event.timeout:g}s and was killed"
    if isinstance(event, messages.Cancelled):
        return "attempt cancelled and killed"
    if isinstance(event, messages.Failed):
        text = f"attempt failed: {event.error_type}: {event.message}"
        if event.traceback and event.error_type != "CommandFailed":  # a command's is its output
            text += "\n" + event.traceback.rstrip("\n")
        return text
    return f"attempt ended: {type(event).__name__.lower()}"
