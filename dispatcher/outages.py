"""Telling an outage of the metadata database from a bug, and riding one out in a loop.

A PostgreSQL restart or failover makes every statement fail for a while, in several ways:
asyncpg's ``ConnectionRefusedError`` (an ``OSError``, not wrapped by SQLAlchemy) while nothing
listens, ``DBAPIError`` with SQLSTATE 57P03 while it starts up, 08003 for a query cut off by
the shutdown, 55000 while a database refuses connections, 25006 on a standby not yet
promoted. None of it is the fault of the row or message at hand: loops wait and try again
(``LoopHealth``), and the API answers 503.
"""

from __future__ import annotations

import logging
import time
import traceback

import anyio
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .backoff import Backoff
from .runtime import BROKER_ERRORS

OUTAGE_SQLSTATE_CLASSES = ("08", "53", "57", "58")
"""Connection exception, insufficient resources, operator intervention, system error."""
OUTAGE_SQLSTATES = ("55000", "25006")
"""A database not accepting connections; a read-only transaction (a standby answering)."""
DRIVER_MODULES = ("sqlalchemy", "asyncpg", "aiosqlite", "sqlite3")


def database_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is away (every statement would fail alike, and
    succeed later), rather than that a statement or a value is wrong."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    if isinstance(exc, DBAPIError):
        code = getattr(exc.orig, "sqlstate", None)
        coded = isinstance(code, str) and (
            code.startswith(OUTAGE_SQLSTATE_CLASSES) or code in OUTAGE_SQLSTATES
        )
        return bool(exc.connection_invalidated) or coded
    return isinstance(exc, OSError) and raised_by_driver(exc)


def raised_by_driver(exc: BaseException) -> bool:
    """Whether the database driver raised ``exc`` (asyncpg lets a refused connect's
    ``OSError`` through unwrapped; a broker's ``OSError`` comes from elsewhere)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return any(_module_root(frame.filename) in DRIVER_MODULES for frame in frames)


def _module_root(filename: str) -> str:
    parts = filename.replace("\\", "/").split("/")
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    return parts[-2] if len(parts) > 1 else ""


def describe(exc: BaseException) -> str:
    """What went wrong, for a log line: an operator reads whether the database is away."""
    if database_outage(exc):
        return "database unreachable"
    if isinstance(exc, BROKER_ERRORS):
        return "broker unreachable"
    return f"unexpected error ({type(exc).__name__})"


class LoopHealth:
    """Backs a long-running loop off while a round fails, logging each outage once.

    The first failure is a warning (with the traceback when it is not a database outage: it
    may be a bug), the next ones are debug lines, and the first success after them says how
    long the loop waited."""

    def __init__(self, loop: str, log: logging.Logger, backoff: Backoff | None = None) -> None:
        self.loop = loop
        self.log = log
        self.backoff = backoff or Backoff()
        self.failing_since: float | None = None

    def failed(self, exc: BaseException) -> float:
        """Note a failed round; return the seconds to wait before the next one."""
        what = describe(exc)
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            self.log.warning(
                f"{what}: the {self.loop} waits and tries again",
                exc_info=None if what.endswith("unreachable") else exc,
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )
        else:
            self.log.debug(f"{what}: the {self.loop} is still waiting", extra={"error": repr(exc)})
        return self.backoff.next()

    async def wait(self, exc: BaseException) -> None:
        await anyio.sleep(self.failed(exc))

    def ok(self) -> None:
        """Note a round that worked: the next failure starts a new outage."""
        if self.failing_since is None:
            return
        waited = time.monotonic() - self.failing_since
        self.failing_since = None
        self.backoff.reset()
        self.log.info(f"the {self.loop} works again", extra={"waited": round(waited, 3)})
