"""The synchronous client (``httpx.Client``)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from rexec.schemas.api import (
    AgentView,
    ApiKeyCreated,
    ApiKeyView,
    AuditEntry,
    LogGrant,
    PoolView,
    Principal,
    Role,
    SubmitTask,
    TaskChanges,
    TaskHistoryEntry,
    TaskView,
    TokenCreated,
    TokenView,
)

from . import _calls
from ._calls import Call
from ._config import ClientConfig

T = TypeVar("T")


class RexecClient:
    """The Remote Execution API from Python, with the same verbs as the ``rexec`` CLI.

    ``base_url`` defaults to ``REXEC_API_URL``; ``api_key`` to ``REXEC_API_KEY``; ``ca_file``
    (the CA bundle an HTTPS API's certificate is checked against) to ``REXEC_CA_FILE``.
    Errors raise :class:`~client.RexecError` with the server's message.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        ca_file: str | None = None,
        timeout: float = _calls.DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = ClientConfig.make(base_url, api_key, timeout, ca_file)
        self._http = httpx.Client(transport=transport, **self.config.httpx_options())

    @property
    def base_url(self) -> str:
        return self.config.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RexecClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, call: Call[T]) -> T:
        sent = 0
        while True:
            sent += 1
            try:
                response = self._http.send(call.request(self._http))
            except httpx.TransportError as exc:
                delay = _calls.resend_delay(call, exc, sent)
                if delay is None:
                    raise _calls.unreachable(self.base_url, exc) from exc
                time.sleep(delay)
                continue
            return call.result(response)

    # tasks

    def submit(
        self,
        pool: str,
        target: str | None = None,
        *,
        command: Sequence[str] | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        retry_backoff: float | None = None,
        expires_in: float | None = None,
        idempotency_key: str | None = None,
        secrets: Sequence[str] = (),
        sensitive: bool = False,
        final_exit_codes: Sequence[int] = (),
    ) -> TaskView:
        """Submit ``target`` (``module:function``) or ``command`` (argv) to ``pool``.

        ``secrets``: names the agent resolves from its own backend; values never leave it.
        ``sensitive``: viewer API keys are not shown the task's arguments.
        ``final_exit_codes``: a command's exit codes that fail it with no further attempt."""
        body = _calls.submit_body(
            pool,
            target,
            command,
            args,
            kwargs,
            timeout,
            max_attempts,
            retry_backoff,
            expires_in,
            idempotency_key,
            secrets,
            sensitive,
            final_exit_codes,
        )
        return self._run(_calls.submit(body))

    def submit_many(self, tasks: Sequence[SubmitTask]) -> list[str]:
        """Submit many tasks (one transaction per chunk of 5,000); return their ids in order."""
        ids: list[str] = []
        for start in range(0, len(tasks), _calls.BATCH_CHUNK):
            chunk = tasks[start : start + _calls.BATCH_CHUNK]
            ids.extend(self._run(_calls.submit_batch(chunk)).ids)
        return ids

    def get(self, task_id: str, *, wait: float | None = None) -> TaskView:
        """The task; with ``wait`` (at most 60 s), once terminal or when the wait ran out."""
        return self._run(_calls.get(task_id, wait))

    def wait(self, task_ids: str | Sequence[str], timeout: float | None = None) -> list[TaskView]:
        """Long-poll until every task is terminal, or ``timeout`` seconds passed (then the
        tasks come back as they are: check their ``state``)."""
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        views: dict[str, TaskView] = {}
        for start in range(0, len(ids), _calls.WAIT_CHUNK):
            pending = ids[start : start + _calls.WAIT_CHUNK]
            while pending:
                pending = _calls.merge_waited(views, self._run(_calls.wait_many(pending, deadline)))
                if _calls.expired(deadline):
                    break
        return [views[task_id] for task_id in ids if task_id in views]

    def list_tasks(
        self,
        *,
        pool: str | None = None,
        state: str | None = None,
        idempotency_key: str | None = None,
        limit: int = 100,
    ) -> list[TaskView]:
        """Tasks, newest first; ``idempotency_key`` finds the task submitted with that key."""
        return self._run(_calls.list_tasks(pool, state, limit, idempotency_key))

    def changes(
        self,
        after: int | None = None,
        *,
        pools: Sequence[str] = (),
        wait: float = 0,
        limit: int = 500,
    ) -> TaskChanges:
        """Task state changes after the cursor ``after``, oldest first (at most ``limit``, of
        ``pools`` if given); pass the answer's ``cursor`` as the next ``after``. Without
        ``after``: no changes, and the cursor to start from. ``wait`` (at most 60 s): hold the
        request until a change comes. With PostgreSQL a change may be skipped (it committed
        after a later one was read): reconcile now and then with ``wait(ids, timeout=0)``."""
        return self._run(_calls.changes(after, pools, wait, limit))

    def cancel(self, task_id: str) -> TaskView:
        return self._run(_calls.cancel(task_id))

    def history(self, task_id: str) -> list[TaskHistoryEntry]:
        return self._run(_calls.history(task_id))

    def log_grant(self, task_id: str, attempt: int | None = None) -> LogGrant:
        """Where an attempt's log is, and a short-lived grant to read it from its agent
        (:func:`rexec.client.agentlog.stream_agent_log` does the reading)."""
        return self._run(_calls.log_grant(task_id, attempt))

    # pools

    def create_pool(
        self, name: str, description: str = "", *, max_running: int | None = None
    ) -> PoolView:
        return self._run(_calls.create_pool(name, description, max_running))

    def update_pool(self, name: str, *, max_running: int | None) -> PoolView:
        """Set the pool's limit of running tasks (None: no limit)."""
        return self._run(_calls.update_pool(name, max_running))

    def list_pools(self) -> list[PoolView]:
        return self._run(_calls.list_pools())

    def drain_pool(self, name: str) -> PoolView:
        return self._run(_calls.drain_pool(name))

    def resume_pool(self, name: str) -> PoolView:
        return self._run(_calls.resume_pool(name))

    # tokens and agents

    def create_token(
        self, pool: str, name: str = "", *, expires_in: float | None = None
    ) -> TokenCreated:
        return self._run(_calls.create_token(pool, name, expires_in))

    def list_tokens(self, *, pool: str | None = None) -> list[TokenView]:
        return self._run(_calls.list_tokens(pool))

    def revoke_token(self, token_id: str) -> TokenView:
        return self._run(_calls.revoke_token(token_id))

    # operator API keys and the audit log

    def create_api_key(
        self, role: Role | str, name: str = "", *, expires_in: float | None = None
    ) -> ApiKeyCreated:
        return self._run(_calls.create_api_key(Role(role), name, expires_in))

    def list_api_keys(self) -> list[ApiKeyView]:
        return self._run(_calls.list_api_keys())

    def revoke_api_key(self, key_id: str) -> ApiKeyView:
        return self._run(_calls.revoke_api_key(key_id))

    def login(self) -> Principal:
        """Check this client's API key: who it belongs to and its role (audited)."""
        return self._run(_calls.login())

    def audit(self, *, limit: int = 100) -> list[AuditEntry]:
        return self._run(_calls.audit(limit))

    def list_agents(self, *, pool: str | None = None) -> list[AgentView]:
        return self._run(_calls.list_agents(pool))

    def health(self) -> dict[str, str]:
        return self._run(_calls.health())

    def metrics(self) -> str:
        """The dispatcher's ``/metrics`` text: queue depths, live agents, requeues..."""
        return self._run(_calls.metrics())
