"""Leases in Redis: which agent runs which attempt, decided atomically by Lua scripts.

A lease key ``lease:<task>:<attempt>`` holds the agent id. Claiming is one script so two
deliveries of one attempt (a relay replay, a redelivery) can never both start: the second
finds a live holder. A holder whose heartbeat key is gone is dead, and its lease is taken
over. The agent also keeps a set of the leases it holds, and re-asserts them on each beat,
so a Redis restart that lost every key does not orphan running attempts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from redis.asyncio import Redis

from schemas.names import RedisKeys

LEASE_TTL = 24 * 3600
"""Seconds a lease lives while held: long, so keys never leak; re-asserted on every beat."""
RELEASED_TTL = 600
"""Seconds a released lease lingers, so a late duplicate delivery is still recognised."""

_CLAIM = """
-- KEYS: lease, cancel marker, agent's lease set. ARGV: agent id, ttl, heartbeat key prefix,
-- set member. Returns {outcome, previous holder}.
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {'cancelled', ''}
end
local holder = redis.call('GET', KEYS[1])
if holder then
  if holder == ARGV[1] or redis.call('EXISTS', ARGV[3] .. holder) == 1 then
    return {'duplicate', holder}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[4])
return {'claimed', holder or ''}
"""

_RELEASE = """
-- KEYS: lease, agent's lease set. ARGV: agent id, lingering ttl, set member.
redis.call('SREM', KEYS[2], ARGV[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

_ABANDON = """
-- KEYS: lease, agent's lease set. ARGV: agent id, set member.
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
"""

_REASSERT = """
-- KEYS: agent's lease set, then one lease key per held lease. ARGV: agent id, ttl, then one
-- set member per lease key. Recreates lost leases; returns {member, holder, ...} for leases
-- another agent holds now.
local lost = {}
for i = 2, #KEYS do
  local member = ARGV[i + 1]
  local holder = redis.call('GET', KEYS[i])
  if (not holder) or holder == ARGV[1] then
    redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2])
    redis.call('SADD', KEYS[1], member)
  else
    redis.call('SREM', KEYS[1], member)
    table.insert(lost, member)
    table.insert(lost, holder)
  end
end
return lost
"""


class Claim(enum.StrEnum):
    CLAIMED = "claimed"
    DUPLICATE = "duplicate"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class ClaimResult:
    outcome: Claim
    previous_holder: str
    """For ``duplicate``: who holds it. For ``claimed``: the dead agent taken over, or ''."""


@dataclass(frozen=True, slots=True)
class LostLease:
    task_id: str
    attempt: int
    holder: str


def member(task_id: str, attempt: int) -> str:
    return f"{task_id}:{attempt}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class LeaseStore:
    """The agent's side of the lease protocol."""

    def __init__(self, redis: Redis, keys: RedisKeys, agent_id: str) -> None:
        self.redis = redis
        self.keys = keys
        self.agent_id = agent_id
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._abandon = redis.register_script(_ABANDON)
        self._reassert = redis.register_script(_REASSERT)
        self.pending_releases: set[tuple[str, int]] = set()
        """Releases that failed (Redis unreachable); retried on each heartbeat."""

    async def claim(self, task_id: str, attempt: int) -> ClaimResult:
        raw = await self._claim(
            keys=[
                self.keys.lease(task_id, attempt),
                self.keys.cancelled(task_id),
                self.keys.agent_leases(self.agent_id),
            ],
            args=[self.agent_id, LEASE_TTL, self.keys.agent(""), member(task_id, attempt)],
        )
        return ClaimResult(Claim(_text(raw[0])), _text(raw[1]))

    async def release(self, task_id: str, attempt: int) -> None:
        await self._release(
            keys=[self.keys.lease(task_id, attempt), self.keys.agent_leases(self.agent_id)],
            args=[self.agent_id, RELEASED_TTL, member(task_id, attempt)],
        )

    async def abandon(self, task_id: str, attempt: int) -> None:
        """Undo a claim of an attempt that never started, so another agent can claim it."""
        await self._abandon(
            keys=[self.keys.lease(task_id, attempt), self.keys.agent_leases(self.agent_id)],
            args=[self.agent_id, member(task_id, attempt)],
        )

    async def release_pending(self) -> None:
        for task_id, attempt in list(self.pending_releases):
            await self.release(task_id, attempt)
            self.pending_releases.discard((task_id, attempt))

    async def reassert(self, held: list[tuple[str, int]]) -> list[LostLease]:
        """Refresh (or recreate) every lease in ``held``; report those another agent took."""
        if not held:
            return []
        raw = await self._reassert(
            keys=[self.keys.agent_leases(self.agent_id)]
            + [self.keys.lease(task_id, attempt) for task_id, attempt in held],
            args=[self.agent_id, LEASE_TTL, *(member(t, a) for t, a in held)],
        )
        lost: list[LostLease] = []
        for i in range(0, len(raw), 2):
            task_id, _, attempt = _text(raw[i]).rpartition(":")
            lost.append(LostLease(task_id, int(attempt), _text(raw[i + 1])))
        return lost
