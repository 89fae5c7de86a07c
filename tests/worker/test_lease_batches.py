"""The lease store sends the claims and releases of one moment in one script call: within a
batch they keep their order and their rules, and nobody waits forever once it stopped."""

from __future__ import annotations

import uuid

import anyio
import pytest
import redis.asyncio

from rexec.schemas.names import RedisKeys
from rexec.worker.leases import Claim, ClaimResult, LeaseStore, LeaseStoreStopped
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.anyio


async def test_one_batch_claims_an_attempt_once_and_keeps_the_order(keys: RedisKeys) -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    store = LeaseStore(client, keys, "pool", f"agent-{uuid.uuid4().hex[:6]}")
    task = uuid.uuid4().hex
    await client.set(keys.cancelled("pool", "cancelled-task"), b"1")
    results: dict[str, ClaimResult] = {}

    async def claim(name: str, task_id: str, attempt: int) -> None:
        results[name] = await store.claim(task_id, attempt)

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.run)
        async with anyio.create_task_group() as callers:  # all queued before the first call
            callers.start_soon(claim, "first", task, 1)
            callers.start_soon(claim, "copy", task, 1)
            callers.start_soon(claim, "cancelled", "cancelled-task", 1)
            callers.start_soon(claim, "next attempt", task, 2)
        await store.release(task, 1)
        tg.cancel_scope.cancel()
    outcomes = {name: result.outcome for name, result in results.items()}
    assert outcomes == {
        "first": Claim.CLAIMED,
        "copy": Claim.DUPLICATE,
        "cancelled": Claim.CANCELLED,
        "next attempt": Claim.CLAIMED,
    }
    assert results["copy"].previous_holder == store.agent_id
    lease = keys.lease("pool", task, 1)
    assert 0 < await client.ttl(lease) <= 600  # released: lingers for late duplicates
    assert await client.smembers(keys.agent_leases(store.agent_id)) == {f"{task}:2".encode()}
    with pytest.raises(LeaseStoreStopped):
        await store.claim(task, 3)
    await client.aclose()
