"""The audit log: who (an API key, the bootstrap key, an agent token) did what, and when.

Token, API-key and operator actions are written here; a task's state changes are in
``task_transitions`` and ``rexec events`` joins the two for one task (a cancel shows who asked).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from rexec.schemas.api import AuditEntry, Principal, TaskHistoryEntry

from .db.models import AuditEvent
from .runtime import Runtime

MAX_LIMIT = 10_000
CANCEL = "task.cancel"

_encoder = msgspec.json.Encoder()
_detail = msgspec.json.Decoder(dict[str, Any])


def describe(kind: str, actor_id: str, name: str) -> str:
    """How an actor is named in listings: ``apikey <id> (<name>)`` or ``bootstrap``."""
    if kind == "bootstrap":
        return "bootstrap"
    return f"{kind} {actor_id}" + (f" ({name})" if name else "")


def add(
    session: AsyncSession,
    *,
    actor_kind: str,
    actor_id: str,
    actor_name: str,
    action: str,
    target: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add an audit row inside the caller's transaction."""
    session.add(
        AuditEvent(
            at=time.time(),
            actor_kind=actor_kind,
            actor_id=actor_id,
            actor_name=actor_name,
            action=action,
            target=target,
            detail_json=_encoder.encode(detail or {}).decode(),
        )
    )


async def record(
    rt: Runtime,
    principal: Principal,
    action: str,
    target: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Record an operator's action (after it succeeded), in its own transaction."""
    async with rt.sessions.begin() as session:
        add(
            session,
            actor_kind=principal.kind,
            actor_id=principal.id,
            actor_name=principal.name,
            action=action,
            target=target,
            detail=detail,
        )


def _entry(row: AuditEvent) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        at=row.at,
        actor_kind=row.actor_kind,
        actor_id=row.actor_id,
        actor_name=row.actor_name,
        action=row.action,
        target=row.target,
        detail=_detail.decode(row.detail_json),
    )


async def list_entries(rt: Runtime, limit: int = 100) -> list[AuditEntry]:
    """The newest ``limit`` audit entries, newest first."""
    async with rt.sessions() as session:
        rows = await session.scalars(
            select(AuditEvent).order_by(AuditEvent.id.desc()).limit(max(1, min(limit, MAX_LIMIT)))
        )
        return [_entry(row) for row in rows]


async def cancel_entries(session: AsyncSession, task_id: str) -> list[TaskHistoryEntry]:
    """A task's cancel requests as history entries (the state they found, and who asked)."""
    rows = await session.scalars(
        select(AuditEvent)
        .where(AuditEvent.action == CANCEL, AuditEvent.target == task_id)
        .order_by(AuditEvent.id)
    )
    entries = []
    for row in rows:
        detail = _detail.decode(row.detail_json)
        state = str(detail.get("state", ""))
        entries.append(
            TaskHistoryEntry(
                at=row.at,
                attempt=int(detail.get("attempt", 0)),
                from_state=state or None,
                to_state=state,
                agent_id=detail.get("agent_id"),
                reason="cancel requested",
                by=describe(row.actor_kind, row.actor_id, row.actor_name),
            )
        )
    return entries


def merge_history(
    entries: Sequence[TaskHistoryEntry], cancels: Sequence[TaskHistoryEntry]
) -> list[TaskHistoryEntry]:
    """A task's transitions with its cancel requests: a queued task's cancel names who on its
    ``cancelled`` transition; a running task's is its own entry (the agent stops it later)."""
    merged = list(entries)
    extra = []
    for cancel in cancels:
        for index, entry in enumerate(merged):
            if (
                cancel.from_state == "queued"
                and entry.to_state == "cancelled"
                and entry.reason == "cancel_requested"
                and entry.by is None
            ):
                merged[index] = msgspec.structs.replace(entry, by=cancel.by)
                break
        else:
            extra.append(cancel)
    return sorted([*merged, *extra], key=lambda e: (e.at, e.by is not None))
