"""Leases in Redis: which agent runs which attempt, decided atomically by Lua scripts.

A lease key ``lease:<task>:<attempt>`` holds the agent id. Claiming is one script so two
deliveries of one attempt (a relay replay, a redelivery) can never both start: the second
finds a live holder. A holder whose heartbeat key is gone is dead, and its lease is taken
over. The agent also keeps a set of the leases it holds, and re-asserts them on each beat,
so a Redis restart that lost every key does not orphan running attempts.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

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


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[str | int]
    done: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ScriptPipeline:
    """Sends the script calls made while others are on the wire together, in one pipeline.

    Each call is still one Lua script, atomic on its own; only the round trips are shared.
    Deliveries come in bursts (the prefetch), so claims and releases batch well, which
    saves the agent and Redis a write and a wake-up per task.
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._pending: list[_Call] = []
        self._flusher: asyncio.Task[None] | None = None
        self.round_trips = 0

    async def call(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any:
        call = _Call(script, keys, args)
        self._pending.append(call)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await call.done

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # calls made in this turn of the loop join the first batch
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._send(batch)
                except BaseException as exc:
                    for call in batch:
                        _fail(call, exc)
                    if not isinstance(exc, Exception):
                        raise
        finally:
            self._flusher = None
            for call in self._pending:  # cancelled while more were queued
                _fail(call, ConnectionError("lease pipeline stopped"))
            self._pending = []

    async def _send(self, batch: list[_Call]) -> None:
        for _ in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for call in batch:
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            self.round_trips += 1
            results = await pipe.execute(raise_on_error=False)
            retry: list[_Call] = []
            for call, result in zip(batch, results, strict=True):
                if call.done.done():  # its caller was cancelled meanwhile
                    continue
                if isinstance(result, NoScriptError):
                    retry.append(call)
                elif isinstance(result, Exception):
                    call.done.set_exception(result)
                else:
                    call.done.set_result(result)
            if not retry:
                return
            for script in {id(c.script): c.script for c in retry}.values():
                script.sha = await self.redis.script_load(script.script)
            batch = retry
        for call in batch:
            _fail(call, NoScriptError("lease script not loaded after a retry"))


def _fail(call: _Call, exc: BaseException) -> None:
    if call.done.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        call.done.cancel()
    else:
        call.done.set_exception(exc)


class LeaseStore:
    """The agent's side of the lease protocol."""

    def __init__(self, redis: Redis, keys: RedisKeys, agent_id: str) -> None:
        self.redis = redis
        self.keys = keys
        self.agent_id = agent_id
        self.pipeline = ScriptPipeline(redis)
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._abandon = redis.register_script(_ABANDON)
        self._reassert = redis.register_script(_REASSERT)
        self.pending_releases: set[tuple[str, int]] = set()
        """Releases that failed (Redis unreachable); retried on each heartbeat."""

    async def claim(self, task_id: str, attempt: int) -> ClaimResult:
        raw = await self.pipeline.call(
            self._claim,
            [
                self.keys.lease(task_id, attempt),
                self.keys.cancelled(task_id),
                self.keys.agent_leases(self.agent_id),
            ],
            [self.agent_id, LEASE_TTL, self.keys.agent(""), member(task_id, attempt)],
        )
        return ClaimResult(Claim(_text(raw[0])), _text(raw[1]))

    async def release(self, task_id: str, attempt: int) -> None:
        await self.pipeline.call(
            self._release,
            [self.keys.lease(task_id, attempt), self.keys.agent_leases(self.agent_id)],
            [self.agent_id, RELEASED_TTL, member(task_id, attempt)],
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
