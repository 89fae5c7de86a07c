"""Runs one attempt (a function in a child, or a command) and says how it ended, as an event.

The attempt runs inside its cancel scope: the deadline is the task's timeout, and a stop
(cancel, lease lost, shutdown) cancels the scope. Either way the runner kills the process, and
the stop reason, or the deadline, decides the event.

The secrets a task names are resolved first, inside the same scope: one that cannot be
resolved fails the attempt before its code runs. A command gets them in its environment, a
function through ``rexec.worker.context.secret``; the ``Reporter`` masks their values in the event.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable

import anyio
import msgspec

from rexec.schemas import messages

from . import protocol
from .attempts import Attempt, StopReason
from .capture import AttemptCapture
from .children import ChildDied, ChildPool, Sink
from .command import run_command
from .environment import task_environment
from .logstore import LogStore, Mask
from .reports import Reporter
from .secrets import Resolver, SecretError

log = logging.getLogger("rexec.agent.execution")


class Executor:
    def __init__(
        self,
        children: ChildPool,
        reporter: Reporter,
        logs: LogStore | None = None,
        mask: Mask | None = None,
        resolver: Resolver | None = None,
        hidden_env: Iterable[str] = (),
    ) -> None:
        self.children = children
        self.reporter = reporter
        self.logs = logs
        self.mask = mask
        """Applied to every log line before it is written (secret masking)."""
        self.resolver = resolver
        self.hidden_env = tuple(hidden_env)

    async def execute(self, attempt: Attempt) -> messages.TaskEvent | None:
        """The attempt's terminal event, or None when it is no longer ours to report."""
        task = attempt.task
        outcome: protocol.Outcome | None = None
        event: messages.TaskEvent | None
        capture = AttemptCapture(self.logs, task, self.mask)
        try:
            with attempt.scope:
                if task.timeout is not None:
                    attempt.scope.deadline = anyio.current_time() + task.timeout
                outcome = await self._run(task, capture.sink)
            if outcome is not None:
                event = self._from_outcome(task, outcome)
            else:
                event = self._from_stop(task, attempt.stop_reason)
            capture.end(event)
            log_tail, log_ref = await capture.finish()
        finally:
            capture.close_now()
        if isinstance(event, messages.LOGGED_EVENTS) and log_ref:
            event = msgspec.structs.replace(event, log_tail=log_tail, log_ref=log_ref)
        return event

    async def _secrets(self, task: messages.TaskMessage) -> dict[str, str]:
        if not task.secrets:
            return {}
        if self.resolver is None:
            raise SecretError("this agent has no secrets backend", retryable=False)
        return await self.resolver.resolve(task.secrets)

    async def _run(self, task: messages.TaskMessage, sink: Sink) -> protocol.Outcome:
        try:
            secrets = await self._secrets(task)
        except SecretError as exc:
            self._log(logging.WARNING, "task secrets unavailable", task, error=str(exc))
            return protocol.failure(exc.error_type, str(exc), retryable=exc.retryable)
        try:
            if task.kind == "command":
                env = task_environment(hidden_prefixes=self.hidden_env)
                env.update(secrets)
                return await run_command(
                    task.argv,
                    sink,
                    env=env,
                    children=self.children,
                    final_exit_codes=task.final_exit_codes,
                )
            return await self.children.call(
                protocol.Call(
                    target=task.target, args=task.args, kwargs=task.kwargs, secrets=secrets
                ),
                sink,
            )
        except ChildDied as exc:
            self._log(logging.ERROR, "child process died", task, error=str(exc))
            return protocol.failure("WorkerCrashed", str(exc), retryable=True)
        except Exception as exc:  # a bug of ours must still end the attempt, retryably
            log.exception("agent error running the attempt", extra=self._ids(task))
            return protocol.failure(
                "AgentError",
                f"the agent failed while running the attempt: {exc!r}",
                traceback.format_exc(),
                retryable=True,
            )

    def _from_outcome(
        self, task: messages.TaskMessage, outcome: protocol.Outcome
    ) -> messages.TaskEvent:
        if outcome.ok:
            return self.reporter.event(messages.Succeeded, task, result=outcome.result)
        self._log(logging.INFO, "task failed", task, error_type=outcome.error_type)
        return self.reporter.failed(
            task,
            outcome.error_type,
            outcome.message,
            retryable=outcome.retryable,
            traceback=outcome.traceback,
        )

    def _from_stop(
        self, task: messages.TaskMessage, reason: StopReason | None
    ) -> messages.TaskEvent | None:
        if reason is None:  # the deadline cancelled the scope
            assert task.timeout is not None
            self._log(logging.INFO, "task timed out and was killed", task, timeout=task.timeout)
            return self.reporter.event(messages.TimedOut, task, timeout=task.timeout)
        if reason is StopReason.CANCEL:
            self._log(logging.INFO, "task cancelled and killed", task)
            return self.reporter.event(messages.Cancelled, task)
        if reason is StopReason.SHUTDOWN:
            return self.reporter.failed(
                task,
                messages.AGENT_SHUTDOWN,
                f"agent {self.reporter.agent_id} shut down before the attempt finished; "
                "it is retried on another agent",
                retryable=True,
            )
        return None  # LEASE_LOST: the attempt is another agent's now; that agent reports

    def _ids(self, task: messages.TaskMessage) -> dict[str, object]:
        return {
            "agent_id": self.reporter.agent_id,
            "task_id": task.task_id,
            "attempt": task.attempt,
        }

    def _log(self, level: int, event: str, task: messages.TaskMessage, **fields: object) -> None:
        log.log(level, event, extra={**self._ids(task), **fields})
