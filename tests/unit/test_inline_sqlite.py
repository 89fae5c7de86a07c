"""The dispatcher's SQLite statements run in the event loop's thread (``inline_sqlite``), with
SQLAlchemy's aiosqlite dialect otherwise unchanged: results, errors and rollbacks as before."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError

from rexec.dispatcher.db.engine import make_engine, make_sessionmaker

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_statements_run_in_the_event_loops_thread(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    threads: set[int] = set()

    @event.listens_for(engine.sync_engine, "connect")
    def _record_thread(dbapi_connection: Any, _record: Any) -> None:
        # A SQL function runs in the thread that runs the statement calling it.
        dbapi_connection.create_function("thread_id", 0, threading.get_ident)

    before = threading.active_count()
    try:
        async with engine.connect() as connection:
            threads.add((await connection.execute(text("SELECT thread_id()"))).scalar_one())
            assert threading.active_count() == before, "no driver thread was started"
    finally:
        await engine.dispose()
    assert threads == {threading.get_ident()}


async def test_transactions_results_and_errors_behave_as_with_aiosqlite(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    sessions = make_sessionmaker(engine)
    try:
        async with sessions.begin() as session:
            await session.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
            await session.execute(text("INSERT INTO t (id, v) VALUES (1, 'one'), (2, 'two')"))
        with pytest.raises(IntegrityError):
            async with sessions.begin() as session:
                await session.execute(text("INSERT INTO t (id, v) VALUES (3, 'three')"))
                await session.execute(text("INSERT INTO t (id, v) VALUES (1, 'again')"))
        async with sessions() as session:
            # A result left unread is closed without the driver's thread (soft close).
            await session.execute(text("SELECT v FROM t"))
            rows = (await session.execute(text("SELECT id, v FROM t ORDER BY id"))).all()
        assert [tuple(row) for row in rows] == [(1, "one"), (2, "two")], "rolled back whole"
    finally:
        await engine.dispose()
