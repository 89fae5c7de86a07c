"""The watchdog: finds attempts whose agent died or hung, and hands them to a healthy agent.

It runs on one dispatcher replica at a time (a leader lease in the database, fenced by its
epoch). An agent is dead when its Redis heartbeat key is gone. A Redis outage is not "all
agents dead": while Redis is unreachable the watchdog pauses, and after Redis comes back, lost
its data (the epoch key is missing), or is another server (its ``run_id`` changed: a restart,
or a Sentinel failover that promoted a replica, which may lack the newest heartbeat writes),
it waits one heartbeat TTL before judging anyone, so live agents have time to write their
keys again.

It reads tasks without locking them, so an agent's event (applied by any replica) may commit
between its read and its write: every write is guarded on what was read and dropped when the
row changed, and the leader's epoch is checked again just before each commit.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import defaultdict

import anyio
from redis.exceptions import RedisError
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from rexec.schemas import messages, names
from rexec.schemas.api import TaskState
from rexec.schemas.redis_client import call_timeout

from . import statemachine, transitions
from .backoff import Backoff
from .db.models import Agent, Outbox, Task
from .leadership import LeaderLease
from .management import close_agent_connections
from .outages import LoopHealth
from .runtime import Runtime

log = logging.getLogger("rexec.watchdog")

LEASE_TOMBSTONE_TTL = 86_400
CLOSE_RETRY_FOR = 12.0
BACKSTOP_MARGIN = 60.0
"""Seconds past an attempt's timeout (and a TTL) before the watchdog times it out itself."""
EXPIRE_CHUNK = 500
"""Queued tasks expired per transaction (one ``IN (...)`` parameter each)."""
EXPIRE_CHUNKS = 20
"""Chunks expired per tick at most: the rest wait a tick, and lost agents are not kept waiting."""
AGENT_LOST_ERROR = (
    '{"type": "AgentLost", "message": "the agent running this attempt stopped heartbeating"}'
)


class _Deposed(Exception):
    """Raised inside a transaction to roll it back: another replica leads now."""


class RedisGate:
    """Says when heartbeats can be trusted: Redis reachable, and not just back from a loss.

    "A loss" is anything after which a live agent's key may be missing: Redis was unreachable,
    the epoch key is gone (data lost), the server answering is not the one trusted before
    (``run_id``; a client that follows a Sentinel failover may never see an error), or Redis
    stalled (frozen, partitioned). Every call has a deadline (``redis_client.call_timeout``, a
    quarter of the heartbeat TTL), so a stall that long is an error, and a shorter one cannot
    let a live agent's key expire; an answer that took about that long counts as a stall too.
    The grace is one heartbeat TTL plus a call's deadline: an agent's beat that was in flight
    when Redis came back fails at its deadline, and the next one writes its key again.
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.epoch_key = f"{rt.keys.prefix}:epoch"
        self.trusted_from = 0.0
        self.reachable = True
        self.server: str | None = None
        """``run_id`` of the Redis server judged on; None until first seen (or unknown)."""
        self.call_timeout = call_timeout(rt.settings.heartbeat_ttl)
        self.slow = self.call_timeout * 0.9
        """Seconds an answer may take before Redis is taken to have stalled."""

    async def trusted(self) -> bool:
        now = time.time()
        began = time.monotonic()
        try:
            async with self.rt.redis.pipeline(transaction=False) as pipe:
                pipe.set(self.epoch_key, uuid.uuid4().hex, nx=True)
                pipe.info("server")
                created, info = await pipe.execute(raise_on_error=False)
            if isinstance(created, Exception):
                raise created
        except (RedisError, OSError) as exc:
            if self.reachable:
                log.warning("redis unreachable: watchdog paused", extra={"error": str(exc)})
            self.reachable = False
            return False
        run_id = _run_id(info)
        took = time.monotonic() - began
        if not self.reachable:
            self.grace("came back", now)
        elif took > self.slow:
            self.grace(f"answered after {took:.1f} s (stalled)", now)
        elif created:
            self.grace("lost its data (or is new)", now)
        elif self.server is not None and run_id is not None and run_id != self.server:
            self.grace("is another server (failover or restart)", now)
        self.reachable = True
        self.server = run_id
        return now >= self.trusted_from

    def still_prompt(self, began: float) -> bool:
        """Whether a read of heartbeat keys that began at ``began`` (monotonic) came back in
        time to be judged on; if not, start the grace and say no."""
        took = time.monotonic() - began
        if took <= self.slow:
            return True
        self.grace(f"answered after {took:.1f} s (stalled)", time.time())
        return False

    def same_server(self, info: object) -> bool:
        """Whether ``info`` (an ``INFO server`` reply read beside heartbeat keys) comes from
        the server the gate trusted; if not, start the grace and say no."""
        run_id = _run_id(info)
        if run_id is None or self.server is None or run_id == self.server:
            return True
        self.server = run_id
        self.grace("is another server (failover or restart)", time.time())
        return False

    def grace(self, why: str, now: float) -> None:
        grace = self.rt.settings.heartbeat_ttl + self.call_timeout
        log.warning(f"redis {why}: judging no agent for one heartbeat TTL", extra={"grace": grace})
        self.trusted_from = max(self.trusted_from, now + grace)


def _run_id(info: object) -> str | None:
    """The server's ``run_id`` from an ``INFO server`` reply; None where INFO is refused."""
    if isinstance(info, dict):
        run_id = info.get("run_id")
        return str(run_id) if run_id else None
    return None


class Watchdog:
    def __init__(self, rt: Runtime, replica: str | None = None) -> None:
        self.rt = rt
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        interval = rt.settings.watchdog_interval
        self.lease = LeaderLease(rt.sessions, "watchdog", self.replica, ttl=max(3 * interval, 3.0))
        self.gate = RedisGate(rt)
        self._background: anyio.abc.TaskGroup | None = None
        """Where follow-up cut-offs run (set by ``run``; a watchdog driven tick by tick, as in
        tests, has none and cuts off once)."""

    async def run(self) -> None:
        """Tick forever. A tick that fails (database away, or a bug) is logged once per
        outage and tried again next interval: the watchdog pauses, it never stops."""
        interval = self.rt.settings.watchdog_interval
        health = LoopHealth("watchdog", log, Backoff(base=interval, cap=max(interval, 2.0)))
        try:
            async with anyio.create_task_group() as self._background:
                while True:
                    try:
                        if await self.lease.acquire():
                            await self.tick()
                    except Exception as exc:
                        await health.wait(exc)
                        continue
                    health.ok()
                    await anyio.sleep(interval)
        finally:
            with anyio.CancelScope(shield=True):
                await self._release()

    async def _release(self) -> None:
        """Hand the lead over on the way out, if the database lets us (else it expires)."""
        try:
            await self.lease.release()
        except Exception as exc:
            log.warning("could not release the watchdog's lead", extra={"error": repr(exc)})

    async def tick(self) -> None:
        await self.expire_queued()
        if await self.gate.trusted():
            await self.requeue_lost()
            await self.backstop_timeouts()

    async def requeue_lost(self) -> None:
        """Judge the agents that run tasks, and those that say they are online though idle: a
        hung idle agent's open prefetch window swallows new deliveries, which would wait for
        the broker's heartbeat timeout (a minute or more) unless it is cut off."""
        async with self.rt.sessions() as session:
            running = (
                await session.execute(
                    select(Task.agent_id).where(Task.state == TaskState.RUNNING).distinct()
                )
            ).scalars()
            online = (
                await session.execute(select(Agent.id).where(Agent.state == "online"))
            ).scalars()
            agent_ids = sorted({a for a in running if a} | set(online))
        if not agent_ids:
            return
        began = time.monotonic()
        async with self.rt.redis.pipeline(transaction=False) as pipe:
            # One connection, so INFO tells which server answered the EXISTS: a failover
            # since the gate's check must not turn keys the new master lacks into deaths.
            pipe.info("server")
            for agent_id in agent_ids:
                pipe.exists(self.rt.keys.agent(agent_id))
            info, *alive = await pipe.execute(raise_on_error=False)
        errors = [e for e in alive if isinstance(e, Exception)]
        if errors:
            raise errors[0]
        if not (self.gate.still_prompt(began) and self.gate.same_server(info)):
            return
        for agent_id, is_alive in zip(agent_ids, alive, strict=True):
            if not is_alive:
                await self.agent_lost(agent_id)

    async def agent_lost(self, agent_id: str) -> None:
        """Cut the agent off, then hand its attempts back as new attempts.

        Its connection is closed first, so the new attempts cannot be delivered to a hung
        agent whose open prefetch window would swallow them.
        """
        async with self.rt.sessions() as session:
            agent = await session.get(Agent, agent_id)
        closed = False
        if agent is not None:
            closed = await self.cut_off(agent.pool, agent_id)
        now = time.time()
        stopped: list[tuple[str, str, int]] = []
        requeued = 0
        try:
            async with self.rt.sessions.begin() as session:
                if not await self.lease.still_held(session):
                    return
                tasks = (
                    await session.scalars(
                        select(Task).where(
                            Task.state == TaskState.RUNNING, Task.agent_id == agent_id
                        )
                    )
                ).all()
                for task in tasks:
                    decision = statemachine.on_agent_lost(transitions.snapshot(task), agent_id)
                    if not isinstance(decision, statemachine.Transition):
                        continue
                    if await self.write(
                        session, task, decision, now, "agent_lost", AGENT_LOST_ERROR
                    ):
                        stopped.append((task.pool, task.id, task.attempt))
                        requeued += decision.retry_in is not None
                row = await session.get(Agent, agent_id)
                if row is not None:
                    if row.state != "lost":  # the credentials' keep window starts now
                        row.lost_at = now
                    row.state = "lost"
                await self.fence(session, "agent_lost")
        except _Deposed:
            return
        if requeued:
            self.rt.metrics.requeues.labels("agent_lost").inc(requeued)
        if not stopped:
            if agent is not None and agent.state == "online":
                log.warning(
                    "agent lost while idle: cut off",
                    extra={"agent_id": agent_id, "connection_closed": closed},
                )
                if not closed:
                    self._keep_cutting_off(agent.pool, agent_id)
            return
        log.warning(
            "agent lost: its attempts were handed back",
            extra={
                "agent_id": agent_id,
                "tasks": [t for _, t, _ in stopped],
                "connection_closed": closed,
            },
        )
        self.rt.wake_relay()
        await self.stop_attempts(agent_id, stopped)
        if agent is not None and not closed:
            self._keep_cutting_off(agent.pool, agent_id)

    def _keep_cutting_off(self, pool: str, agent_id: str) -> None:
        if self._background is not None:
            self._background.start_soon(self.keep_cutting_off, pool, agent_id)

    async def cut_off(self, pool: str, agent_id: str) -> bool:
        closed = await close_agent_connections(
            self.rt.settings, pool, agent_id, "rexec: agent stopped heartbeating"
        )
        return closed > 0

    async def keep_cutting_off(self, pool: str, agent_id: str) -> None:
        """The management API lists a connection only after its first stats emission (about
        5 s): a young agent's connection may not be listed yet, so look again for a while."""
        deadline = anyio.current_time() + CLOSE_RETRY_FOR
        while anyio.current_time() < deadline:
            await anyio.sleep(1.0)
            if await self.cut_off(pool, agent_id):
                return

    async def backstop_timeouts(self) -> None:
        """Attempts past their timeout by ``BACKSTOP_MARGIN`` and a TTL: their agent lives (a
        dead one's attempts are requeued) yet failed to enforce it. The margin is long because
        a live agent's own ``timed_out`` or result may still wait in a lagging events queue:
        the backstop must not end the attempt first and have that report refused."""
        now = time.time()
        margin = self.rt.settings.heartbeat_ttl + BACKSTOP_MARGIN
        by_agent: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
        requeued = 0
        try:
            async with self.rt.sessions.begin() as session:
                if not await self.lease.still_held(session):
                    return
                candidates = await session.scalars(
                    select(Task).where(Task.state == TaskState.RUNNING, Task.timeout.is_not(None))
                )
                for task in candidates:
                    if (
                        task.started_at is None
                        or task.timeout is None
                        or task.started_at + task.timeout + margin > now
                    ):
                        continue
                    decision = statemachine.on_overdue(transitions.snapshot(task))
                    if not isinstance(decision, statemachine.Transition):
                        continue
                    error = f'{{"type": "TimedOut", "message": "no result {margin:g}s past the {task.timeout:g}s timeout"}}'
                    if await self.write(session, task, decision, now, "timeout_backstop", error):
                        by_agent[task.agent_id or ""].append((task.pool, task.id, task.attempt))
                        requeued += decision.retry_in is not None
                if by_agent:
                    await self.fence(session, "timeout_backstop")
        except _Deposed:
            return
        if requeued:
            self.rt.metrics.requeues.labels("timeout_backstop").inc(requeued)
        for agent_id, attempts in by_agent.items():
            await self.stop_attempts(agent_id, attempts)
        if by_agent:
            self.rt.wake_relay()

    async def expire_queued(self) -> None:
        """Queued tasks past their schedule-to-start limit (also in drained pools) expire.

        A chunk per transaction, at most ``EXPIRE_CHUNKS`` a tick: a backlog that expires at
        once (100,000 tasks with one limit) was one ``IN (...)`` with a parameter per task,
        past what the database takes, and the failing tick never reached ``requeue_lost``."""
        for _ in range(EXPIRE_CHUNKS):
            read, expired = await self._expire_chunk()
            if read < EXPIRE_CHUNK or not expired:
                return

    async def _expire_chunk(self) -> tuple[int, int]:
        """Expire the oldest-due chunk; return how many candidates it read, and expired."""
        now = time.time()
        expired: list[tuple[str, str]] = []
        try:
            async with self.rt.sessions.begin() as session:
                if not await self.lease.still_held(session):
                    return 0, 0
                candidates = (
                    await session.scalars(
                        select(Task)
                        .where(
                            Task.state == TaskState.QUEUED,
                            Task.expires_at.is_not(None),
                            Task.expires_at < now,
                        )
                        .order_by(Task.expires_at)
                        .limit(EXPIRE_CHUNK)
                    )
                ).all()
                for task in candidates:
                    decision = statemachine.on_expiry(transitions.snapshot(task))
                    if not isinstance(decision, statemachine.Transition):
                        continue
                    if await self.write(session, task, decision, now, "expiry"):
                        expired.append((task.pool, task.id))
                if expired:
                    await session.execute(
                        delete(Outbox).where(Outbox.task_id.in_([t for _, t in expired]))
                    )
                    await self.fence(session, "expiry")
        except _Deposed:
            return 0, 0
        if expired:
            # Copies already in a queue must not start: agents check this marker when claiming.
            async with self.rt.redis.pipeline(transaction=False) as pipe:
                for pool, task_id in expired:
                    pipe.set(
                        self.rt.keys.cancelled(pool, task_id), "expired", ex=LEASE_TOMBSTONE_TTL
                    )
                await pipe.execute()
            self.rt.notify_applied()
        return len(candidates), len(expired)

    async def write(
        self,
        session: AsyncSession,
        task: Task,
        decision: statemachine.Transition,
        now: float,
        action: str,
        error_json: str | None = None,
    ) -> bool:
        """Write ``decision`` unless the task changed since it was read; say whether it was.

        The row was read without a lock: an event committed since (a success, a start) is
        newer truth than the watchdog's judgement, so the watchdog's loses, and says so."""
        if await transitions.apply_if_unchanged(
            session, task, decision, now, error_json=error_json
        ):
            return True
        self.rt.metrics.watchdog_lost_races.labels(action, "task_changed").inc()
        log.info(
            "watchdog lost the race: the task changed since it was read; left as it is",
            extra={
                "action": action,
                "task_id": task.id,
                "attempt": task.attempt,
                "agent_id": task.agent_id,
                "decided": decision.to.value,
            },
        )
        return False

    async def fence(self, session: AsyncSession, action: str) -> None:
        """Roll the transaction back (raise ``_Deposed``) unless this replica still leads."""
        if await self.lease.fence(session):
            return
        self.rt.metrics.watchdog_lost_races.labels(action, "deposed").inc()
        log.warning(
            "watchdog deposed: another replica took the lead; this transaction's writes "
            "are rolled back",
            extra={"action": action, "replica": self.replica, "epoch": self.lease.epoch},
        )
        self.lease.epoch = None
        raise _Deposed

    async def stop_attempts(self, agent_id: str, attempts: list[tuple[str, str, int]]) -> None:
        """Fence the old attempts: tombstone their leases and tell the agent to kill them.

        Whichever the agent sees first when it wakes up, the control message or its lease
        re-assertion finding the lease taken, it stops the attempt; its results are rejected.
        """
        try:
            async with self.rt.redis.pipeline(transaction=False) as pipe:
                for pool, task_id, attempt in attempts:
                    pipe.set(
                        self.rt.keys.lease(pool, task_id, attempt),
                        names.LEASE_TOMBSTONE,
                        ex=LEASE_TOMBSTONE_TTL,
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not tombstone leases", extra={"error": str(exc)})
        if agent_id:
            for _, task_id, attempt in attempts:
                control = messages.Control(action="lease_lost", task_id=task_id, attempt=attempt)
                await self.rt.publish_control(agent_id, control)
