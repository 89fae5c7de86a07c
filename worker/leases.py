"""Leases in Redis: which agent runs which attempt, decided atomically by Lua scripts.

A lease key ``lease:<pool>:<task>:<attempt>`` holds the agent id. Claiming is one script so two
deliveries of one attempt (a relay replay, a redelivery) can never both start: the second
finds a live holder. A holder whose heartbeat key is gone is dead, and its lease is taken
over. The agent also keeps a set of the leases it holds, and re-asserts them on each beat,
so a Redis restart that lost every key does not orphan running attempts.
"""

from __future__ import annotations

import enum
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import anyio
from redis.asyncio import Redis

from rexec.schemas.names import LEASE_TOMBSTONE, RedisKeys

LEASE_TTL = 24 * 3600
"""Seconds a lease lives while held: long, so keys never leak; re-asserted on every beat."""
RELEASED_TTL = 600
"""Seconds a released lease lingers, so a late duplicate delivery is still recognised."""
MAX_BATCH = 256
"""Claims and releases sent in one script call at most."""

_BATCH = """
-- Claims and releases of one agent in one call (one round trip for every attempt that
-- reached this point in the same moment). KEYS: the agent's lease set, then one lease key
-- per operation. ARGV: agent id, lease ttl, lingering ttl, heartbeat key prefix, the
-- watchdog's tombstone (an attempt it ended: never claimed again), then per
-- operation its kind ('claim' or 'release'), set member and cancel marker ('' for a
-- release). Returns {outcome, previous holder, fence} per operation, flattened; a claim's
-- fence is Redis' clock in microseconds: a takeover is a later claim and gets a higher one.
-- Unlike a counter in a key, the clock survives a Redis restart that lost every key (after
-- a failover, the new primary's clock must not lag by more than the time between claims).
-- A claim finds the attempt cancelled, held (by this agent or a live one: a duplicate) or
-- free (never held, or held by an agent whose heartbeat key is gone: taken over). A
-- tombstoned or released attempt is a duplicate too: a redelivery of it must not run. A
-- release marks the lease 'released:<agent>' for a while (RELEASED_TTL), so a late duplicate
-- is still recognised after the agent that ran it is gone.
-- The keys only read (cancel markers, holders' heartbeats) are not KEYS: Redis' ACL takes
-- every declared key as written, and an agent may only read those.
local out = {}
-- The fencing token of this call's claims, read before anything is written. An agent whose
-- Redis user may not run TIME (registered before fencing) claims with 0: fenced by id alone.
local clock = redis.pcall('TIME')
local fence = 0
if type(clock) == 'table' and clock.err == nil then
  fence = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
for i = 2, #KEYS do
  local base = 5 + 3 * (i - 2)
  local kind, member, marker = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local lease = KEYS[i]
  if kind == 'release' then
    redis.call('SREM', KEYS[1], member)
    if redis.call('GET', lease) == ARGV[1] then
      redis.call('SET', lease, 'released:' .. ARGV[1], 'EX', ARGV[3])
    end
    table.insert(out, 'released')
    table.insert(out, '')
    table.insert(out, 0)
  elseif redis.call('EXISTS', marker) == 1 then
    table.insert(out, 'cancelled')
    table.insert(out, '')
    table.insert(out, 0)
  else
    local holder = redis.call('GET', lease)
    if holder and (holder == ARGV[1] or holder == ARGV[5]
                   or string.sub(holder, 1, 9) == 'released:'
                   or redis.call('EXISTS', ARGV[4] .. holder) == 1) then
      table.insert(out, 'duplicate')
      table.insert(out, holder)
      table.insert(out, 0)
    else
      redis.call('SET', lease, ARGV[1], 'EX', ARGV[2])
      redis.call('SADD', KEYS[1], member)
      table.insert(out, 'claimed')
      table.insert(out, holder or '')
      table.insert(out, fence)
    end
  end
end
return out
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
    fence: int = 0
    """For ``claimed``: the claim's fencing token (see ``messages._Event.fence``)."""


@dataclass(frozen=True, slots=True)
class LostLease:
    task_id: str
    attempt: int
    holder: str


@dataclass(eq=False)
class _Operation:
    kind: Literal["claim", "release"]
    task_id: str
    attempt: int
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: ClaimResult | None = None
    error: Exception | None = None

    def settle(self, outcome: ClaimResult | None = None, error: Exception | None = None) -> None:
        self.outcome, self.error = outcome, error
        self.done.set()


class LeaseStoreStopped(ConnectionError):
    """A claim or release asked of a lease store whose sender has stopped (shutdown)."""


def member(task_id: str, attempt: int) -> str:
    return f"{task_id}:{attempt}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class LeaseStore:
    """The agent's side of the lease protocol."""

    def __init__(self, redis: Redis, keys: RedisKeys, pool: str, agent_id: str) -> None:
        self.redis = redis
        self.keys = keys
        self.pool = pool
        self.agent_id = agent_id
        self._batch = redis.register_script(_BATCH)
        self._abandon = redis.register_script(_ABANDON)
        self._reassert = redis.register_script(_REASSERT)
        self.pending_releases: set[tuple[str, int]] = set()
        """Releases that failed (Redis unreachable); retried on each heartbeat."""
        self._queued: list[_Operation] = []
        self._wakeup = anyio.Event()
        self._stopped = False

    async def claim(self, task_id: str, attempt: int) -> ClaimResult:
        operation = await self._submit("claim", task_id, attempt)
        assert operation.outcome is not None
        return operation.outcome

    async def release(self, task_id: str, attempt: int) -> None:
        await self._submit("release", task_id, attempt)

    async def _submit(
        self, kind: Literal["claim", "release"], task_id: str, attempt: int
    ) -> _Operation:
        if self._stopped:
            raise LeaseStoreStopped("the lease store has stopped")
        operation = _Operation(kind, task_id, attempt)
        self._queued.append(operation)
        self._wakeup.set()
        await operation.done.wait()
        if operation.error is not None:
            raise operation.error
        return operation

    async def run(self) -> None:
        """Send the queued claims and releases, one script call (one round trip) per batch.

        One batch is in flight at a time: what queues up meanwhile goes in the next, so under
        load one call carries the claims and releases of many attempts."""
        in_flight: list[_Operation] = []
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                while self._queued:
                    in_flight = self._queued[:MAX_BATCH]
                    del self._queued[:MAX_BATCH]
                    await self._send(in_flight)
                    in_flight = []
        finally:
            self._stopped = True
            for operation in [*in_flight, *self._queued]:
                if not operation.done.is_set():
                    operation.settle(error=LeaseStoreStopped("the lease store stopped"))
            self._queued.clear()

    async def _send(self, operations: list[_Operation]) -> None:
        args: list[str | int] = [
            self.agent_id,
            LEASE_TTL,
            RELEASED_TTL,
            self.keys.agent(""),
            LEASE_TOMBSTONE,
        ]
        for op in operations:
            marker = self.keys.cancelled(self.pool, op.task_id) if op.kind == "claim" else ""
            args += [op.kind, member(op.task_id, op.attempt), marker]
        try:
            raw = await self._batch(
                keys=[self.keys.agent_leases(self.agent_id)]
                + [self.keys.lease(self.pool, op.task_id, op.attempt) for op in operations],
                args=args,
            )
        except Exception as exc:  # each caller decides: retry, hand back, or keep for later
            for op in operations:
                op.settle(error=exc)
            return
        for i, op in enumerate(operations):
            if op.kind == "claim":
                outcome, holder, fence = raw[3 * i : 3 * i + 3]
                op.settle(ClaimResult(Claim(_text(outcome)), _text(holder), int(fence)))
            else:
                op.settle()

    async def abandon(self, task_id: str, attempt: int) -> None:
        """Undo a claim of an attempt that never started, so another agent can claim it."""
        await self._abandon(
            keys=[
                self.keys.lease(self.pool, task_id, attempt),
                self.keys.agent_leases(self.agent_id),
            ],
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
            + [self.keys.lease(self.pool, task_id, attempt) for task_id, attempt in held],
            args=[self.agent_id, LEASE_TTL, *(member(t, a) for t, a in held)],
        )
        lost: list[LostLease] = []
        for i in range(0, len(raw), 2):
            task_id, _, attempt = _text(raw[i]).rpartition(":")
            lost.append(LostLease(task_id, int(attempt), _text(raw[i + 1])))
        return lost


class OwnClaims:
    """What this agent knows of its own claims, to read a ``duplicate`` held by itself.

    A claim whose reply was lost (a socket timeout, a connection cut by a Redis failover) is
    sent again, by redis-py's retry or by the agent's; the second finds the lease held by this
    very agent. That is this agent's claim, not a duplicate delivery, unless the agent is
    claiming, holding or has finished that attempt itself: dropping it would lose the task.
    """

    def __init__(self, remember_for: float = RELEASED_TTL, limit: int = 100_000) -> None:
        self.remember_for = remember_for
        self.limit = limit
        self._claiming: Counter[tuple[str, int]] = Counter()
        self._finished: OrderedDict[tuple[str, int], float] = OrderedDict()

    def claiming(self, key: tuple[str, int]) -> None:
        self._claiming[key] += 1

    def claimed(self, key: tuple[str, int]) -> None:
        """The claim call returned (whatever its outcome)."""
        self._claiming[key] -= 1
        if self._claiming[key] <= 0:
            del self._claiming[key]

    def finished(self, key: tuple[str, int]) -> None:
        """The attempt ended here: its lease lingers, and a late copy is a real duplicate."""
        now = time.monotonic()
        self._finished[key] = now
        self._finished.move_to_end(key)
        while self._finished and (
            len(self._finished) > self.limit
            or next(iter(self._finished.values())) < now - self.remember_for
        ):
            self._finished.popitem(last=False)

    def is_lost_reply(self, key: tuple[str, int], held: set[tuple[str, int]]) -> bool:
        """A ``duplicate`` held by this agent: whether it is its own claim, answered late."""
        return key not in held and key not in self._claiming and key not in self._finished
