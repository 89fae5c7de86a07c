"""The benchmark's task bodies, plain functions every system wraps (rexec calls them by target).

- ``noop()``: nothing (W1 throughput).
- ``stamp(bench_id, sink)``: records the wall time it started (W2 latency), returns it.
- ``sleep_record(bench_id, seconds, sink)``: records its start, sleeps, records its end (W3, W4),
  so the harness can count tasks run twice and tasks missing.

``sink`` is ``"<redis url>#<key prefix>"`` (``RunContext.sink``). Records, all in Redis:

- ``<prefix>:start`` hash: bench id -> first start time (``HSETNX``).
- ``<prefix>:exec`` list: ``"<bench id> <start|end> <pid> <worker index> <time>"`` per event, where
  worker index is ``BENCH_WORKER_INDEX`` from the environment (``-`` if unset).
"""

from __future__ import annotations

import os
import time

import redis

_CLIENTS: dict[str, redis.Redis] = {}


def _client(sink: str) -> tuple[redis.Redis, str]:
    url, _, prefix = sink.partition("#")
    client = _CLIENTS.get(url)
    if client is None:
        client = redis.Redis.from_url(url)
        _CLIENTS[url] = client
    return client, prefix


def _event(bench_id: str, phase: str, at: float) -> str:
    worker = os.environ.get("BENCH_WORKER_INDEX", "-")
    return f"{bench_id} {phase} {os.getpid()} {worker} {at:.6f}"


def noop() -> None:
    return None


def stamp(bench_id: str, sink: str) -> float:
    started = time.time()
    client, prefix = _client(sink)
    client.hsetnx(f"{prefix}:start", bench_id, f"{started:.6f}")
    return started


def sleep_record(bench_id: str, seconds: float, sink: str) -> str:
    started = time.time()
    client, prefix = _client(sink)
    pipe = client.pipeline(transaction=False)
    pipe.hsetnx(f"{prefix}:start", bench_id, f"{started:.6f}")
    pipe.rpush(f"{prefix}:exec", _event(bench_id, "start", started))
    pipe.execute()
    time.sleep(seconds)
    client.rpush(f"{prefix}:exec", _event(bench_id, "end", time.time()))
    return bench_id
