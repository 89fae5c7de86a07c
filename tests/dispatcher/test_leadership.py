"""The watchdog's leader lease on the real databases: one holder, fenced by its epoch."""

from __future__ import annotations

import pytest

from rexec.dispatcher.db.engine import make_engine, make_sessionmaker
from rexec.dispatcher.leadership import LeaderLease


@pytest.mark.anyio
async def test_one_leader_at_a_time_and_a_new_epoch_fences_the_old(
    database_url: str, pool_name: str
) -> None:
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        first = LeaderLease(sessions, pool_name, "replica-1", ttl=60)
        second = LeaderLease(sessions, pool_name, "replica-2", ttl=60)
        assert await first.acquire()
        assert not await second.acquire()
        assert await first.acquire(), "the holder renews its own lease"

        stale_epoch = first.epoch
        await first.release()
        first.epoch = stale_epoch  # a replica that paused and still believes it leads
        assert await second.acquire()
        assert second.epoch == (stale_epoch or 0) + 1
        async with sessions() as session:
            assert not await first.still_held(session)
            assert await second.still_held(session)
        assert not await first.acquire()
    finally:
        await engine.dispose()


@pytest.mark.anyio
async def test_an_expired_lease_is_taken_over(database_url: str, pool_name: str) -> None:
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        assert await LeaderLease(sessions, pool_name, "gone", ttl=-1).acquire()
        taker = LeaderLease(sessions, pool_name, "alive", ttl=60)
        assert await taker.acquire()
        assert taker.epoch == 2
    finally:
        await engine.dispose()
