"""The demo's task functions: what a customer's own code would look like to rexec."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time


def add(x: int, y: int) -> int:
    return x + y


def checksum(text: str, rounds: int = 100) -> str:
    digest = text.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


async def fetch(delay: float) -> dict[str, float]:
    """Stands in for I/O-bound work: an async function that waits."""
    await asyncio.sleep(delay)
    return {"waited": delay}


def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def flaky(probability: float) -> str:
    """Fails at random, so some tasks succeed only on a retry."""
    if random.random() < probability:
        raise ConnectionError("the upstream service did not answer (simulated)")
    return "ok"


def broken() -> None:
    raise ValueError("this task always fails: it shows retries ending in 'failed'")
