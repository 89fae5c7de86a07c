"""How many attempts the relay puts in one task message, per pool.

One message per attempt costs a publish, a confirm, a signature, a delivery and an ack each;
a batch pays them once. A pool gets batches only when every agent that may consume its queue
speaks protocol 1.2 (an older agent would dead-letter a batch), and a batch is never larger
than the smallest concurrency among them, so an agent can start all of a batch at once
when it is idle. A burst is also spread over the pool's agents: 40 due attempts for two
agents make batches of at most 20, so one agent does not take the burst alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from rexec.schemas import messages

from .db.models import Agent
from .limits import Pooled

REFRESH = 2.0
"""Seconds the relay trusts what it read of the pools' agents before reading it again."""
CONSUMING_STATES = ("online", "lost")
"""Agents that may consume a pool's queue: a lost agent may wake up and take deliveries."""

Row = TypeVar("Row", bound=Pooled)


@dataclass(frozen=True, slots=True)
class PoolAgents:
    agents: int
    oldest_minor: int
    smallest_concurrency: int


async def read_pool_agents(session: AsyncSession) -> dict[str, PoolAgents]:
    rows = await session.execute(
        select(
            Agent.pool,
            func.count(),
            func.min(Agent.protocol_minor),
            func.min(Agent.concurrency),
        )
        .where(Agent.state.in_(CONSUMING_STATES))
        .group_by(Agent.pool)
    )
    return {pool: PoolAgents(n, minor, concurrency) for pool, n, minor, concurrency in rows}


@dataclass
class BatchSizes:
    """Each pool's largest batch (``tasks_per_message`` capped as above), read every
    ``REFRESH`` seconds."""

    tasks_per_message: int
    pools: dict[str, PoolAgents] = field(default_factory=dict)
    read_at: float = -math.inf

    async def refresh(self, session: AsyncSession) -> None:
        if self.tasks_per_message > 1 and time.monotonic() - self.read_at >= REFRESH:
            self.pools = await read_pool_agents(session)
            self.read_at = time.monotonic()

    def largest(self, pool: str) -> int:
        agents = self.pools.get(pool)
        if (
            self.tasks_per_message <= 1
            or agents is None
            or agents.oldest_minor < messages.BATCHES_FROM_MINOR
        ):
            return 1
        return max(1, min(self.tasks_per_message, agents.smallest_concurrency))

    def split(self, rows: Sequence[Row]) -> list[list[Row]]:
        """The rows in messages: per pool, in order, each at most the pool's largest batch and
        at most its share of this round's rows per agent."""
        by_pool: dict[str, list[Row]] = {}
        for row in rows:
            by_pool.setdefault(row.pool, []).append(row)
        out: list[list[Row]] = []
        for pool, pooled in by_pool.items():
            agents = self.pools.get(pool)
            share = math.ceil(len(pooled) / agents.agents) if agents and agents.agents else 1
            size = max(1, min(self.largest(pool), share))
            out.extend(pooled[i : i + size] for i in range(0, len(pooled), size))
        return out
