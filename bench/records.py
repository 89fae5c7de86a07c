"""Reading what bench.tasks recorded in Redis (the harness side)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import redis


@dataclass(frozen=True)
class ExecEvent:
    bench_id: str
    phase: str  # "start" | "end"
    pid: int
    worker: str  # BENCH_WORKER_INDEX of the worker process, "-" if unknown
    at: float


class Records:
    def __init__(self, redis_url: str, prefix: str) -> None:
        self._client: redis.Redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self._prefix = prefix

    def close(self) -> None:
        self._client.close()

    def starts(self) -> dict[str, float]:
        raw = self._client.hgetall(f"{self._prefix}:start")
        return {str(k): float(v) for k, v in raw.items()}

    def events(self) -> list[ExecEvent]:
        out: list[ExecEvent] = []
        for raw in self._client.lrange(f"{self._prefix}:exec", 0, -1):
            bench_id, phase, pid, worker, at = str(raw).split(" ")
            out.append(ExecEvent(bench_id, phase, int(pid), worker, float(at)))
        return out

    def first_start(self, timeout: float) -> ExecEvent:
        """The first execution start recorded, waiting up to ``timeout`` seconds for one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = self._client.lindex(f"{self._prefix}:exec", 0)
            if raw is not None:
                bench_id, phase, pid, worker, at = str(raw).split(" ")
                return ExecEvent(bench_id, phase, int(pid), worker, float(at))
            time.sleep(0.01)
        raise TimeoutError(f"no task started within {timeout:.0f} s")


def execution_counts(events: list[ExecEvent]) -> tuple[Counter[str], Counter[str]]:
    """(starts per bench id, completed executions per bench id)."""
    started: Counter[str] = Counter(e.bench_id for e in events if e.phase == "start")
    ended: Counter[str] = Counter(e.bench_id for e in events if e.phase == "end")
    return started, ended
