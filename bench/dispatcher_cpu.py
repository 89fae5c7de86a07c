"""CPU the dispatcher spends per task on its hot path: applying events, and relaying attempts.

No broker, Redis or agent: a temporary SQLite database (migrated like ``rexec serve`` does),
the real ``apply_events`` and ``relay_once`` over a Runtime whose broker parts are never used,
and an exchange that accepts every publish at once. CPU is ``time.process_time`` (every thread:
aiosqlite's included), so the figures are the dispatcher's CPU, SQLite's own work included.

    python -m bench.dispatcher_cpu [--tasks 20000] [--batch 200] [--rounds 3] [--database-url URL]

``--database-url`` measures on another (empty) database instead, e.g. a PostgreSQL one; it is
migrated first and keeps the benchmark's rows afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aio_pika
from sqlalchemy import insert

from rexec.dispatcher.db.engine import make_engine, make_sessionmaker
from rexec.dispatcher.db.migrate import upgrade
from rexec.dispatcher.db.models import Outbox, Pool, Task
from rexec.dispatcher.events import apply_events
from rexec.dispatcher.relay import relay_once
from rexec.dispatcher.runtime import Runtime
from rexec.schemas import messages
from rexec.schemas.names import RedisKeys
from rexec.schemas.settings import Settings
from rexec.schemas.signing import Signer, generate_private_key

POOL = "bench"
AGENT = "bench-agent-1"


class AcceptingExchange:
    """Stands for the tasks exchange: every publish is confirmed at once, nothing is sent."""

    async def publish(self, message: aio_pika.Message, routing_key: str, **_: Any) -> None:
        return None


def runtime(url: str) -> Runtime:
    """A Runtime for the database work only: the broker and Redis parts are never touched."""
    engine = make_engine(url)
    unused = cast(Any, None)
    signer = Signer(generate_private_key())
    return Runtime(
        settings=Settings(database_url=url),
        engine=engine,
        sessions=make_sessionmaker(engine),
        redis=unused,
        keys=RedisKeys("bench"),
        connection=unused,
        channel=unused,
        signer=signer,
        public_keys=[signer.public_key],
    )


async def seed(rt: Runtime, count: int) -> list[str]:
    """``count`` queued tasks, each with its first attempt in the outbox (as the API leaves them)."""
    now = time.time()
    ids = [uuid.uuid4().hex for _ in range(count)]
    async with rt.sessions.begin() as session:
        if await session.get(Pool, POOL) is None:
            session.add(Pool(name=POOL, description="", draining=False, created_at=now))
            await session.flush()
        tasks = [
            {
                "id": task_id,
                "pool": POOL,
                "kind": "function",
                "target": "bench.tasks:noop",
                "argv_json": "[]",
                "args_json": "[]",
                "kwargs_json": "{}",
                "secrets_json": "[]",
                "state": "queued",
                "attempt": 1,
                "max_attempts": 3,
                "retry_backoff": 1.0,
                "cancel_requested": False,
                "created_at": now,
                "trace_parent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            }
            for task_id in ids
        ]
        await session.execute(insert(Task.__table__), tasks)
        outbox = [{"task_id": t, "attempt": 1, "available_at": now} for t in ids]
        await session.execute(insert(Outbox.__table__), outbox)
    return ids


def agent_events(task_ids: list[str], batch: int) -> list[list[messages.Event]]:
    """Batches as the events consumer gets them: each task's ``started`` then its ``succeeded``
    (with a log location and tail, as an agent with a log store reports)."""
    batches: list[list[messages.Event]] = []
    half = max(1, batch // 2)
    for start in range(0, len(task_ids), half):
        chunk = task_ids[start : start + half]
        at = time.time()
        batches.append(
            [messages.Started(task_id=t, attempt=1, agent_id=AGENT, at=at) for t in chunk]
        )
        batches.append(
            [
                messages.Succeeded(
                    task_id=t,
                    attempt=1,
                    agent_id=AGENT,
                    at=at + 0.001,
                    result=None,
                    log_tail="",
                    log_ref=f"dir:{POOL}/{t}/1.log",
                )
                for t in chunk
            ]
        )
    return batches


async def cpu_of(work: Callable[[], Awaitable[object]]) -> float:
    started = time.process_time()
    await work()
    return time.process_time() - started


async def relay_all(rt: Runtime) -> None:
    exchange = cast(Any, AcceptingExchange())
    while (await relay_once(rt, exchange))[0]:
        pass


async def apply_all(rt: Runtime, batches: list[list[messages.Event]]) -> None:
    for events in batches:
        await apply_events(rt, events)


async def one_round(rt: Runtime, count: int, batch: int) -> tuple[float, float]:
    """CPU seconds per task of relaying ``count`` attempts, then of applying their events."""
    ids = await seed(rt, count)
    relay = await cpu_of(lambda: relay_all(rt))
    events = await cpu_of(lambda: apply_all(rt, agent_events(ids, batch)))
    return relay / count, events / count


def signing_cost(rt: Runtime, samples: int = 2000) -> float:
    """CPU seconds to sign one task message (part of the relay figure, not database work)."""
    body = messages.encode(
        messages.TaskMessage(
            task_id=uuid.uuid4().hex, attempt=1, pool=POOL, kind="function", target="x"
        )
    )
    started = time.process_time()
    for _ in range(samples):
        rt.signer.sign(body)
    return (time.process_time() - started) / samples


async def main(count: int, batch: int, rounds: int, database_url: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        await asyncio.to_thread(upgrade, url)
        rt = runtime(url)
        try:
            results = [await one_round(rt, count, batch) for _ in range(rounds)]
            sign = signing_cost(rt)
        finally:
            await rt.engine.dispose()
    print(f"database: {url.split('://', 1)[0]}")
    for n, (relay, events) in enumerate(results, 1):
        print(f"round {n}: relay {relay * 1e6:7.1f} µs/task   events {events * 1e6:7.1f} µs/task")
    relay = statistics.median(r for r, _ in results)
    events = statistics.median(e for _, e in results)
    print(
        f"median of {rounds} x {count} tasks (events in batches of {batch}):\n"
        f"  relay (select, build, sign, delete; no publish): {relay * 1e6:7.1f} µs/task"
        f"  (of which signing {sign * 1e6:.1f})\n"
        f"  events (started + succeeded, with log_ref):       {events * 1e6:7.1f} µs/task"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=200, help="events per apply_events call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database-url", help="an empty database to use instead of SQLite")
    args = parser.parse_args()
    asyncio.run(main(args.tasks, args.batch, args.rounds, args.database_url))
