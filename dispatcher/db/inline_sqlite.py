"""SQLite through aiosqlite, with every call run in the event loop's own thread.

aiosqlite runs every statement in a thread of its own and hands each result back through
the event loop: two thread switches per statement, each waiting for the GIL while the loop
is busy. Measured here, a transaction of two statements and a commit took 0.6 ms with the
loop idle and from 1 ms to seconds with it busy, while SQLite itself does it in about 10 µs
(WAL with ``synchronous=NORMAL``: a commit does not wait for the disk). At W2's 200 submits
a second, the dispatcher's transactions held SQLite's one write turn 85% of the time, and a
new task waited 15 ms for its commit.

So the dispatcher's aiosqlite connections run each call at once instead of queueing it for
their thread (the thread is never started), and SQLAlchemy's aiosqlite dialect is used as it
is. Each statement blocks the loop for as long as SQLite takes, which is short: statements
are small and indexed, the process's writers take turns in the loop
(``engine._WritersTakeTurns``), and readers never wait for a writer under WAL. SQLite's busy
handler waits only for another process writing the same file, which rexec does not run (one
dispatcher per SQLite file; replicas need PostgreSQL).

This leans on two attributes of ``aiosqlite.Connection`` (its queue ``_tx``, which
SQLAlchemy's dialect uses too, and its ``_thread``); ``tests/unit/test_inline_sqlite.py``
fails if a release changes them.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_dbapi, SQLiteDialect_aiosqlite

DRIVER = "rexec_inline"
"""The URL's driver name: ``sqlite+rexec_inline:///path``."""


class _RunAtOnce:
    """Stands in for the queue to an aiosqlite connection's thread: runs each call as it is
    queued and settles its future, so awaiting the future does not suspend."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except Exception as exc:
            if future is not None:
                future.set_exception(exc)
            return
        if future is not None:
            future.set_result(result)


class _NoThread:
    def start(self) -> None:
        """Nothing to start: calls run where they are made."""


def connect(database: str, **kwargs: Any) -> aiosqlite.Connection:
    connection = aiosqlite.Connection(lambda: sqlite3.connect(database, **kwargs), 64)
    connection._tx = _RunAtOnce()  # type: ignore[assignment]
    connection._thread = _NoThread()  # type: ignore[assignment]
    return connection


class InlineSQLiteDialect(SQLiteDialect_aiosqlite):
    driver = DRIVER
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> AsyncAdapt_aiosqlite_dbapi:
        module = SimpleNamespace(**{**vars(aiosqlite), "connect": connect})
        return AsyncAdapt_aiosqlite_dbapi(module, sqlite3)  # type: ignore[arg-type]
