"""A leader lease in the metadata database, so one dispatcher replica runs the watchdog.

The lease lives where the watchdog writes: its ``epoch`` grows whenever the holder changes,
and the watchdog checks it again as the last statement of each transaction that writes, holding
the row until its commit (a fencing token), so a replica that paused past its lease cannot
apply anything once another took over.
"""

from __future__ import annotations

import time
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .db.models import Leader


class LeaderLease:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], name: str, holder: str, ttl: float
    ) -> None:
        self.sessions = sessions
        self.name = name
        self.holder = holder
        self.ttl = ttl
        self.epoch: int | None = None

    async def acquire(self) -> bool:
        """Take or renew the lease; return whether this replica leads now."""
        try:
            return await self._acquire(time.time())
        except IntegrityError:  # another replica created the row at the same moment
            self.epoch = None
            return False

    async def _acquire(self, now: float) -> bool:
        async with self.sessions.begin() as session:
            row = await session.get(Leader, self.name, with_for_update=True)
            if row is None:
                session.add(
                    Leader(name=self.name, holder=self.holder, epoch=1, expires_at=now + self.ttl)
                )
                self.epoch = 1
                return True
            if row.holder == self.holder and row.epoch == self.epoch:
                row.expires_at = now + self.ttl
                return True
            if row.expires_at < now:
                row.holder, row.epoch, row.expires_at = self.holder, row.epoch + 1, now + self.ttl
                self.epoch = row.epoch
                return True
            self.epoch = None
            return False

    async def still_held(self, session: AsyncSession) -> bool:
        """Check, inside the caller's transaction, that no one took over since ``acquire``."""
        epoch = await session.scalar(
            select(Leader.epoch).where(Leader.name == self.name, Leader.holder == self.holder)
        )
        return epoch is not None and epoch == self.epoch

    async def fence(self, session: AsyncSession) -> bool:
        """Check, as the last statement before the caller commits, that no one took over;
        if so, keep it that way until the commit.

        ``still_held`` at the start of a transaction is only a snapshot: a takeover may
        commit before the writes do. This is a guarded UPDATE of the lease row instead: it
        waits for a takeover in progress and then sees its epoch, and once it matched it
        holds the row, so a takeover (which locks the row) orders after this commit.
        """
        if self.epoch is None:
            return False
        touched: CursorResult[Any] = cast(
            CursorResult[Any],
            await session.execute(
                update(Leader)
                .where(
                    Leader.name == self.name,
                    Leader.holder == self.holder,
                    Leader.epoch == self.epoch,
                )
                .values(epoch=Leader.epoch)
                .execution_options(synchronize_session=False)
            ),
        )
        return touched.rowcount == 1

    async def release(self) -> None:
        if self.epoch is None:
            return
        async with self.sessions.begin() as session:
            await session.execute(
                update(Leader)
                .where(
                    Leader.name == self.name,
                    Leader.holder == self.holder,
                    Leader.epoch == self.epoch,
                )
                .values(expires_at=0.0)
            )
        self.epoch = None
