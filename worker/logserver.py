"""``GET /logs/<task_id>/<attempt>`` on the agent's health port: one attempt's whole log.

Task logs never leave the execution plane except to a reader the orchestration plane vouched
for: the request must carry ``Authorization: Bearer <grant>``, a grant the API signed for
exactly this task, attempt and agent, still unexpired (``rexec.schemas.loggrant``). ``?follow=1``
streams the log while the attempt runs and ends when it does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import anyio
import anyio.to_thread

from rexec.schemas import loggrant, signing

from .logstore import TASK_ID, LogStore

log = logging.getLogger("rexec.agent.logs")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PATH = re.compile(r"^/logs/([^/]+)/([0-9]{1,6})$")
FOLLOW_POLL = 0.2
"""Seconds between reads of a followed log that has no new bytes."""


@dataclass(frozen=True)
class LogSource:
    """What serving a log needs: the agent's log store, and the key that checks grants."""

    logs: LogStore
    verifier: signing.Verifier
    agent_id: str
    pool: str


def matches(path: str) -> bool:
    return path.startswith("/logs/")


async def serve(source: LogSource, scope: Scope, receive: Receive, send: Send) -> None:
    match = PATH.match(scope["path"])
    if match is None or not TASK_ID.match(match.group(1)):
        await _text(send, 404, "not found: the path is /logs/<task_id>/<attempt>")
        return
    task_id, attempt = match.group(1), int(match.group(2))
    grant = _bearer(scope)
    if grant is None:
        await _text(send, 401, "missing log grant: send 'Authorization: Bearer <grant>'")
        return
    try:
        loggrant.verify(
            source.verifier, grant, task_id=task_id, attempt=attempt, agent_id=source.agent_id
        )
    except loggrant.GrantError as exc:
        log.warning(
            "log request refused",
            extra={
                "agent_id": source.agent_id,
                "task_id": task_id,
                "attempt": attempt,
                "reason": str(exc),
            },
        )
        await _text(send, 403, str(exc))
        return
    store, pool = source.logs, source.pool
    first = await anyio.to_thread.run_sync(store.read, pool, task_id, attempt, 0)
    if first is None and store.is_open(pool, task_id, attempt):
        first = b""  # running, and has written nothing yet
    if first is None:
        await _text(
            send,
            404,
            f"no log of task {task_id} attempt {attempt} on agent {source.agent_id} "
            "(never run here, succeeded without output, or removed after REXEC_LOG_RETENTION)",
        )
        return
    follow = parse_qs(scope.get("query_string", b"").decode()).get("follow", ["0"])[0] in (
        "1",
        "true",
    )
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    async with anyio.create_task_group() as tg:

        async def on_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(on_disconnect)
        offset = 0
        chunk: bytes | None = first
        while True:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                offset += len(chunk)
            else:
                running = store.is_open(pool, task_id, attempt)
                if not (follow and running):
                    # one more read: the last lines may have landed as the attempt closed
                    tail = await anyio.to_thread.run_sync(
                        store.read, pool, task_id, attempt, offset
                    )
                    if tail:
                        await send({"type": "http.response.body", "body": tail, "more_body": True})
                    break
                await anyio.sleep(FOLLOW_POLL)
            chunk = await anyio.to_thread.run_sync(store.read, pool, task_id, attempt, offset)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        tg.cancel_scope.cancel()


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text: str = bytes(value).decode(errors="replace")
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


async def _text(send: Send, status: int, message: str) -> None:
    body = (message + "\n").encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
