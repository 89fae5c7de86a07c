"""The asynchronous client (``httpx.AsyncClient``)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import anyio
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


class AsyncRexecClient:
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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = ClientConfig.make(base_url, api_key, timeout, ca_file)
        self._http = httpx.AsyncClient(transport=transport, **self.config.httpx_options())

    @property
    def base_url(self) -> str:
        return self.config.base_url

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRexecClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self, call: Call[T]) -> T:
        sent = 0
        while True:
            sent += 1
            try:
                response = await self._http.send(call.request(self._http))
            except httpx.TransportError as exc:
                delay = _calls.resend_delay(call, exc, sent)
                if delay is None:
                    raise _calls.unreachable(self.base_url, exc) from exc
                await anyio.sleep(delay)
                continue
            return call.result(response)

    # tasks

    async def submit(
        self,
        pool: str,
        target: str | None = None,
        *,
        command: Sequence[str] | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  (the task's run time limit, not ours)
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
        return await self._run(_calls.submit(body))

    async def submit_many(self, tasks: Sequence[SubmitTask]) -> list[str]:
        """Submit many tasks (one transaction per chunk of 5,000); return their ids in order."""
        ids: list[str] = []
        for start in range(0, len(tasks), _calls.BATCH_CHUNK):
            chunk = tasks[start : start + _calls.BATCH_CHUNK]
            ids.extend((await self._run(_calls.submit_batch(chunk))).ids)
        return ids

    async def get(self, task_id: str, *, wait: float | None = None) -> TaskView:
        """The task; with ``wait`` (at most 60 s), once terminal or when the wait ran out."""
        return await self._run(_calls.get(task_id, wait))

    async def wait(
        self,
        task_ids: str | Sequence[str],
        timeout: float | None = None,  # noqa: ASYNC109  (returns the tasks as they are at the deadline)
    ) -> list[TaskView]:
        """Long-poll until every task is terminal, or ``timeout`` seconds passed (then the
        tasks come back as they are: check their ``state``)."""
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        views: dict[str, TaskView] = {}

        async def chunk(pending: list[str]) -> None:
            while pending:
                waited = await self._run(_calls.wait_many(pending, deadline))
                pending = _calls.merge_waited(views, waited)
                if _calls.expired(deadline):
                    return

        async with anyio.create_task_group() as tg:
            for start in range(0, len(ids), _calls.WAIT_CHUNK):
                tg.start_soon(chunk, ids[start : start + _calls.WAIT_CHUNK])
        return [views[task_id] for task_id in ids if task_id in views]

    async def list_tasks(
        self,
        *,
        pool: str | None = None,
        state: str | None = None,
        idempotency_key: str | None = None,
        limit: int = 100,
    ) -> list[TaskView]:
        """Tasks, newest first; ``idempotency_key`` finds the task submitted with that key."""
        return await self._run(_calls.list_tasks(pool, state, limit, idempotency_key))

    async def changes(
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
        return await self._run(_calls.changes(after, pools, wait, limit))

    async def cancel(self, task_id: str) -> TaskView:
        return await self._run(_calls.cancel(task_id))

    async def history(self, task_id: str) -> list[TaskHistoryEntry]:
        return await self._run(_calls.history(task_id))

    async def log_grant(self, task_id: str, attempt: int | None = None) -> LogGrant:
        """Where an attempt's log is, and a short-lived grant to read it from its agent
        (:func:`rexec.client.agentlog.stream_agent_log` does the reading)."""
        return await self._run(_calls.log_grant(task_id, attempt))

    # pools

    async def create_pool(
        self, name: str, description: str = "", *, max_running: int | None = None
    ) -> PoolView:
        return await self._run(_calls.create_pool(name, description, max_running))

    async def update_pool(self, name: str, *, max_running: int | None) -> PoolView:
        """Set the pool's limit of running tasks (None: no limit)."""
        return await self._run(_calls.update_pool(name, max_running))

    async def list_pools(self) -> list[PoolView]:
        return await self._run(_calls.list_pools())

    async def drain_pool(self, name: str) -> PoolView:
        return await self._run(_calls.drain_pool(name))

    async def resume_pool(self, name: str) -> PoolView:
        return await self._run(_calls.resume_pool(name))

    # tokens and agents

    async def create_token(
        self, pool: str, name: str = "", *, expires_in: float | None = None
    ) -> TokenCreated:
        return await self._run(_calls.create_token(pool, name, expires_in))

    async def list_tokens(self, *, pool: str | None = None) -> list[TokenView]:
        return await self._run(_calls.list_tokens(pool))

    async def revoke_token(self, token_id: str) -> TokenView:
        return await self._run(_calls.revoke_token(token_id))

    # operator API keys and the audit log

    async def create_api_key(
        self, role: Role | str, name: str = "", *, expires_in: float | None = None
    ) -> ApiKeyCreated:
        return await self._run(_calls.create_api_key(Role(role), name, expires_in))

    async def list_api_keys(self) -> list[ApiKeyView]:
        return await self._run(_calls.list_api_keys())

    async def revoke_api_key(self, key_id: str) -> ApiKeyView:
        return await self._run(_calls.revoke_api_key(key_id))

    async def login(self) -> Principal:
        """Check this client's API key: who it belongs to and its role (audited)."""
        return await self._run(_calls.login())

    async def audit(self, *, limit: int = 100) -> list[AuditEntry]:
        return await self._run(_calls.audit(limit))

    async def list_agents(self, *, pool: str | None = None) -> list[AgentView]:
        return await self._run(_calls.list_agents(pool))

    async def health(self) -> dict[str, str]:
        return await self._run(_calls.health())

    async def metrics(self) -> str:
        """The dispatcher's ``/metrics`` text: queue depths, live agents, requeues..."""
        return await self._run(_calls.metrics())
