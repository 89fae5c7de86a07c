"""A randomized fault soak: a steady mixed workload while faults strike at random, then a
check of every task against a ledger of what really ran (issue 20; the way Jepsen tests a
queue).

One dispatcher, three agents, PostgreSQL, a RabbitMQ and a Redis of the soak's own. Faults,
drawn by a seeded ``random.Random`` (the seed is printed, so any run can be repeated): agent
kill -9 (its process alone, as an OOM kill), agent SIGSTOP of its whole process group for
longer than the heartbeat TTL then SIGCONT, agent SIGTERM and a new agent, RabbitMQ restart,
Redis restart (every key lost), Redis FLUSHALL, Redis freeze, dispatcher kill -9 and
restart, PostgreSQL restart. After each, a probe task measures how long until the plane runs work again.

Every task is ``tests.faults.tasks:ledger``: each execution writes a row when it starts and
when it ends, in an SQLite file no fault touches. At the end, for every accepted task:
exactly one terminal state in its history, succeeded, its result one of its finished
executions; and no execution that its agent had been told to stop (lease taken over) ran to
its end after that. ``make soak`` runs 30 minutes; ``tests/faults/test_soak.py`` two.

    python -m tests.faults.soak --minutes 30 [--seed N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from rexec.client import RexecClient, RexecError, TaskView
from rexec.schemas.api import TaskState
from rexec.schemas.settings import load_settings
from tests.conftest import BOOTSTRAP_KEY, SIGNER, SIGNING_KEY
from tests.e2e.conftest import Plane
from tests.faults.conftest import ALLOW
from tests.faults.servers import PrivatePostgres, PrivateRabbit, PrivateRedis
from tests.faults.tasks import LEDGER_SCHEMA
from tests.support import Process, wait_until

LEDGER_TASK = "tests.faults.tasks:ledger"
TTL = 2.0
AGENTS = 3
CONCURRENCY = 4
RECOVERY_TIMEOUT = 120.0
STOPPED_MARK = "was taken over"
"""What an agent logs when it stops an attempt another agent took over (``worker.agent``)."""


@dataclass
class Services:
    rabbit: PrivateRabbit
    redis: PrivateRedis
    postgres: PrivatePostgres
    database: str


@dataclass
class Report:
    seed: int
    minutes: float
    faults: Counter[str]
    tasks: int
    lost: list[str]
    failed: list[str]
    terminal_twice: list[str]
    wrong_result: list[str]
    completed_twice: list[str]
    after_stop: list[str]
    executions: list[int]
    failovers: dict[str, list[float]]

    @property
    def ok(self) -> bool:
        return not (
            self.lost or self.failed or self.terminal_twice or self.wrong_result or self.after_stop
        )

    def table(self) -> str:
        rows = [
            f"soak: seed {self.seed}, {self.minutes:.1f} min, {self.tasks} tasks",
            "faults: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())),
            f"lost {len(self.lost)}, failed {len(self.failed)}, "
            f"terminal twice {len(self.terminal_twice)}, wrong result {len(self.wrong_result)}",
            f"completed twice {len(self.completed_twice)} "
            f"(of which after being told to stop: {len(self.after_stop)})",
        ]
        if self.executions:
            rows.append(
                f"executions per task: mean {statistics.fmean(self.executions):.2f}, "
                f"max {max(self.executions)}"
            )
        for kind, seconds in sorted(self.failovers.items()):
            rows.append(
                f"  {kind:18} back in {statistics.median(seconds):5.1f} s median, "
                f"{max(seconds):5.1f} s max ({len(seconds)})"
            )
        for name in ("lost", "failed", "terminal_twice", "wrong_result", "after_stop"):
            if ids := getattr(self, name):
                rows.append(f"{name}: {ids[:10]}")
        return "\n".join(rows)


@dataclass
class Soak:
    services: Services
    home: Path
    seed: int
    pool: str = field(default_factory=lambda: f"soak{uuid.uuid4().hex[:8]}")

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.ledger = self.home / "ledger.db"
        with sqlite3.connect(self.ledger) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(LEDGER_SCHEMA)
        settings = load_settings(
            {},
            database_url=self.services.database,
            amqp_url=self.services.rabbit.amqp_url,
            management_url=self.services.rabbit.management_url,
            redis_url=self.services.redis.url,
            redis_prefix=f"soak-{uuid.uuid4().hex[:8]}",
            heartbeat_ttl=TTL,
            watchdog_interval=0.5,
            signing_key=SIGNING_KEY,
            signing_public_keys=SIGNER.public_key,
            api_key=BOOTSTRAP_KEY,
        )
        (self.home / "plane").mkdir(parents=True, exist_ok=True)
        self.plane = Plane(settings, self.home / "plane")
        self.dispatcher: Process = self.plane.dispatcher
        self.client = self.plane.client
        self.client.create_pool(self.pool)
        self.agents: list[Process] = []
        self.names = (f"agent{i}" for i in itertools.count())
        for _ in range(AGENTS):
            self.start_agent()
        self.accepted: dict[str, str] = {}
        """task id -> its ledger key."""
        self.faults: Counter[str] = Counter()
        self.failovers: dict[str, list[float]] = defaultdict(list)
        self._stop = threading.Event()

    # -- the plane ----------------------------------------------------------------------------

    def start_agent(self) -> None:
        process = self.plane.start_agent(
            self.pool, "--concurrency", str(CONCURRENCY), *ALLOW, name=next(self.names)
        )
        self.agents.append(process)

    def live_agents(self) -> list[Process]:
        return [a for a in self.agents if a.popen.poll() is None]

    def online(self) -> int:
        try:
            return sum(a.state == "online" for a in self.client.list_agents(pool=self.pool))
        except RexecError:
            return 0

    # -- the workload ---------------------------------------------------------------------------

    def submit_steadily(self, every: float = 0.1) -> None:
        with RexecClient(self.plane.settings.api_url, api_key=BOOTSTRAP_KEY) as client:
            for i in itertools.count():
                if self._stop.wait(every):  # the load's pace, not a wait for a condition
                    return
                key = f"t{i}"
                seconds = self.rng.choice([0.05, 0.2, 0.5, 1.0, 2.0])
                try:
                    task = client.submit(
                        self.pool,
                        LEDGER_TASK,
                        args=[str(self.ledger), key, seconds],
                        idempotency_key=key,
                        max_attempts=20,
                        retry_backoff=0.1,
                    )
                except RexecError:
                    continue  # refused (503 while the database restarts): not accepted
                self.accepted[task.id] = key

    # -- faults -----------------------------------------------------------------------------------

    def fault_kinds(self) -> dict[str, Callable[[], None]]:
        return {
            "agent_kill9": self.agent_kill9,
            "agent_sigstop": self.agent_sigstop,
            "agent_sigterm": self.agent_sigterm,
            "rabbitmq_restart": self.services.rabbit.restart,
            "redis_restart": self.services.redis.restart,
            "redis_freeze": self.redis_freeze,
            "redis_flush": self.redis_flush,
            "dispatcher_kill9": self.dispatcher_kill9,
            "postgres_restart": self.services.postgres.restart,
        }

    def agent_kill9(self) -> None:
        victim = self.rng.choice(self.live_agents())
        victim.signal(signal.SIGKILL)
        victim.popen.wait(30)
        self.start_agent()

    def agent_sigstop(self) -> None:
        victim = self.rng.choice(self.live_agents())
        os.killpg(victim.pid, signal.SIGSTOP)  # the agent and what it runs, as a VM pause
        try:
            self.lasting(TTL * 2)
        finally:
            os.killpg(victim.pid, signal.SIGCONT)

    def agent_sigterm(self) -> None:
        victim = self.rng.choice(self.live_agents())
        victim.signal(signal.SIGTERM)
        self.start_agent()  # the replacement starts while the victim drains
        victim.popen.wait(120)

    def redis_freeze(self) -> None:
        self.services.redis.freeze()
        try:
            self.lasting(TTL * 2)
        finally:
            self.services.redis.thaw()

    def redis_flush(self) -> None:
        """Every key gone at once, the server unchanged (an operator's FLUSHALL)."""
        client = redis.Redis.from_url(self.services.redis.url)
        try:
            client.flushall()
        finally:
            client.close()

    def dispatcher_kill9(self) -> None:
        self.dispatcher.signal(signal.SIGKILL)
        self.dispatcher.popen.wait(30)
        self.dispatcher = self.plane.start_dispatcher()

    def lasting(self, seconds: float) -> None:
        began = time.monotonic()
        wait_until(lambda: time.monotonic() - began >= seconds, seconds + 10, "the fault to last")

    def recovered_in(self) -> float:
        """Seconds until a probe task submitted now succeeds: the plane runs work again."""
        began = time.monotonic()
        key = f"probe-{uuid.uuid4().hex[:8]}"

        def submitted() -> TaskView | None:
            try:
                return self.client.submit(
                    self.pool, LEDGER_TASK, args=[str(self.ledger), key, 0.0], idempotency_key=key
                )
            except RexecError:
                return None

        probe = wait_until(submitted, RECOVERY_TIMEOUT, "the probe accepted")
        self.accepted[probe.id] = key
        wait_until(
            lambda: self.client.get(probe.id).state is TaskState.SUCCEEDED,
            RECOVERY_TIMEOUT,
            "the probe to succeed",
        )
        return time.monotonic() - began

    # -- the run ------------------------------------------------------------------------------------

    def run(self, minutes: float, pause: tuple[float, float] = (3.0, 8.0)) -> Report:
        began = time.monotonic()
        submitter = threading.Thread(target=self.submit_steadily, daemon=True)
        submitter.start()
        kinds = self.fault_kinds()
        try:
            while time.monotonic() - began < minutes * 60:
                self.lasting(self.rng.uniform(*pause))
                kind = self.rng.choice(sorted(kinds))
                print(f"soak: {time.monotonic() - began:6.1f} s  {kind}", flush=True)
                kinds[kind]()
                self.faults[kind] += 1
                self.failovers[kind].append(self.recovered_in())
                wait_until(lambda: self.online() >= AGENTS, RECOVERY_TIMEOUT, "agents online")
        finally:
            self._stop.set()
            submitter.join(60)
        return self.check(minutes=(time.monotonic() - began) / 60)

    def check(self, minutes: float) -> Report:
        ids = list(self.accepted)
        done = {t.id: t for t in self.client.wait(ids, timeout=RECOVERY_TIMEOUT)}
        runs: dict[str, list[tuple[str, float | None]]] = defaultdict(list)
        with sqlite3.connect(self.ledger, timeout=60) as db:
            for execution, key, finished in db.execute(
                "SELECT execution, key, finished FROM executions"
            ):
                runs[key].append((execution, finished))
        stops = self.stop_times()
        lost, failed, twice, wrong, completed_twice, after_stop = [], [], [], [], [], []
        terminal = {s.value for s in TaskState if s.terminal}
        for task_id, key in self.accepted.items():
            task = done.get(task_id)
            if task is None or not task.state.terminal:
                lost.append(task_id)
                continue
            if task.state is not TaskState.SUCCEEDED:
                failed.append(task_id)
            ends = [h for h in self.client.history(task_id) if h.to_state in terminal]
            if len(ends) != 1:
                twice.append(task_id)
            finished = {e: f for e, f in runs[key] if f is not None}
            if task.state is TaskState.SUCCEEDED and task.result not in finished:
                wrong.append(task_id)
            if len(finished) > 1:
                completed_twice.append(task_id)
                told = stops.get(task_id)
                stale = [f for e, f in finished.items() if e != task.result]
                if told is not None and any(f > told + 0.5 for f in stale):
                    after_stop.append(task_id)
        return Report(
            seed=self.seed,
            minutes=minutes,
            faults=self.faults,
            tasks=len(self.accepted),
            lost=lost,
            failed=failed,
            terminal_twice=twice,
            wrong_result=wrong,
            completed_twice=completed_twice,
            after_stop=after_stop,
            executions=[len(runs[key]) for key in self.accepted.values()],
            failovers=dict(self.failovers),
        )

    def stop_times(self) -> dict[str, float]:
        """Task id -> when an agent first logged that it stopped an attempt taken over."""
        found: dict[str, float] = {}
        for agent in self.agents:
            for line in agent.output().splitlines():
                if STOPPED_MARK not in line or not line.startswith("{"):
                    continue
                entry = json.loads(line)
                task_id = entry.get("task_id")
                if task_id:
                    found[task_id] = min(found.get(task_id, entry["ts"]), entry["ts"])
        return found

    def close(self) -> None:
        self._stop.set()
        for process in self.agents:
            if process.popen.poll() is None:
                os.killpg(process.pid, signal.SIGCONT)
        self.plane.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"soak: seed {seed} (repeat with --seed {seed})", flush=True)
    rabbit, redis, postgres = PrivateRabbit(f"soak{os.getpid()}"), PrivateRedis(), PrivatePostgres()
    home = Path(tempfile.mkdtemp(prefix="rexec-soak-"))
    try:
        rabbit.start()
        redis.start()
        postgres.start()
        database = postgres.create_database()
        soak = Soak(Services(rabbit, redis, postgres, database), home, seed)
        try:
            report = soak.run(args.minutes)
        finally:
            soak.close()
    finally:
        for server in (rabbit, redis, postgres):
            server.cleanup()
    print(report.table())
    print(f"logs: {home}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
