"""Engine and session factory for SQLite (default) or PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from sqlalchemy import event, make_url
from sqlalchemy.dialects import registry
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from . import inline_sqlite

registry.register(f"sqlite.{inline_sqlite.DRIVER}", inline_sqlite.__name__, "InlineSQLiteDialect")


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        # Whatever driver the URL names (aiosqlite, the documented one), statements run
        # inline: see inline_sqlite.
        inline = make_url(url).set(drivername=f"sqlite+{inline_sqlite.DRIVER}")
        engine = create_async_engine(inline, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets readers (the API) proceed while the relay and events consumer write.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    if engine.dialect.name == "sqlite":
        return _WritersTakeTurns(engine, expire_on_commit=False)
    return async_sessionmaker(engine, expire_on_commit=False)


class _WritersTakeTurns(async_sessionmaker[AsyncSession]):
    """``begin()`` transactions take turns in the process.

    SQLite has one writer at a time, and a writer that finds the database locked sleeps in its
    busy handler (1 ms, then 2, 5, 10 ... up to 100 ms between looks). The relay, the events
    consumer, the API's group commits and the watchdog each write a few times a second, so
    they kept finding each other and lost tens of milliseconds per transaction, hundreds at
    the worst. Waiting for a lock in the event loop costs nothing; the busy handler is left
    for other processes on the same file. Reads (plain sessions) do not take turns: WAL lets
    them run beside the writer.
    """

    def __init__(self, engine: AsyncEngine, **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        self._turn = anyio.Lock()

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncSession]:  # type: ignore[override]
        async with self._turn, super().begin() as session:
            yield session
