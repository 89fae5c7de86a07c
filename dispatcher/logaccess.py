"""Access to task logs, which stay on the agents: the dispatcher knows where they are and signs
short-lived grants (``rexec.schemas.loggrant``) for reading one attempt's log from its agent."""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from rexec.schemas import loggrant
from rexec.schemas.api import LogGrant, TaskState

from .db.models import Agent, TaskLog, TaskTransition
from .runtime import Runtime
from .service import Invalid, NotFound, _load_task


async def _ran_on(
    session: AsyncSession, task_id: str, attempt: int | None
) -> tuple[int, str] | None:
    """(attempt, agent) of the given attempt's latest start, or of the latest attempt that ran."""
    query = select(TaskTransition.attempt, TaskTransition.agent_id).where(
        TaskTransition.task_id == task_id, TaskTransition.to_state == TaskState.RUNNING.value
    )
    if attempt is not None:
        query = query.where(TaskTransition.attempt == attempt)
    row = (await session.execute(query.order_by(TaskTransition.id.desc()).limit(1))).first()
    if row is None or row[1] is None:
        return None
    return int(row[0]), str(row[1])


async def log_grant(rt: Runtime, task_id: str, attempt: int | None = None) -> LogGrant:
    """Where one attempt's log is (its agent, the agent's log URL, the ref, the tail) and a
    grant to read it there. ``attempt`` defaults to the latest attempt that ran."""
    async with rt.sessions() as session:
        task = await _load_task(session, task_id)
        if attempt is not None and not 1 <= attempt <= task.attempt:
            raise Invalid(
                f"task {task_id} has no attempt {attempt}: it is at attempt {task.attempt}"
            )
        recorded = None
        if attempt is not None:
            recorded = await session.get(TaskLog, (task_id, attempt))
        ran = await _ran_on(session, task_id, attempt)
        if recorded is None and ran is not None:
            recorded = await session.get(TaskLog, (task_id, ran[0]))
        if recorded is not None:
            number, agent_id = recorded.attempt, recorded.agent_id
        elif ran is not None:
            number, agent_id = ran
        else:
            which = f"attempt {attempt} of task {task_id}" if attempt else f"task {task_id}"
            raise NotFound(f"{which} never started on an agent, so it has no log")
        agent = await session.get(Agent, agent_id)
    running = task.state == TaskState.RUNNING.value and task.attempt == number
    expires_at = time.time() + loggrant.GRANT_TTL
    grant = loggrant.issue(
        rt.signer,
        loggrant.LogGrantClaims(
            task_id=task_id, attempt=number, agent_id=agent_id, expires_at=expires_at
        ),
    )
    return LogGrant(
        task_id=task_id,
        attempt=number,
        agent_id=agent_id,
        agent_state=agent.state if agent is not None else "unknown",
        log_url=(agent.log_url or "") if agent is not None else "",
        log_ref=recorded.log_ref if recorded is not None else "",
        log_tail=recorded.log_tail if recorded is not None else "",
        grant=grant,
        expires_at=expires_at,
        running=running,
    )
