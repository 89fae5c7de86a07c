"""Publishing a new task the moment its submit commits, instead of at the relay's next round.

A relay round (read the due rows, publish, wait for the database's write turn, delete) took
about 40 ms on SQLite, most of a new task's time to start. So the submit commits its task
with an outbox row due ``outbox_lease`` seconds later, and hands the row here; this publishes
it at once (confirms, ``mandatory``) and deletes the rows the broker confirmed, many in one
transaction, off the request's path. Until then the row is a lease, and the relay is the
backstop: a dispatcher that dies between the commit and the publish, or a publish that
fails, leaves the row to fall due, and the relay publishes it then (a failed publish makes
its row due at once). A row that outlives its lease after a confirmed publish (a delete
slower than the lease) is published twice, and agents drop the duplicate by its lease, as
after a relay that died between its publish and its delete.

Only pools without ``max_running`` and not draining take this path: the relay counts a
limited pool's slots, and holds a draining pool's tasks. So do rows beyond ``MAX_IN_FLIGHT``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import anyio
from anyio.abc import TaskGroup, TaskStatus
from sqlalchemy import delete, update
from sqlalchemy.exc import SQLAlchemyError

from .db.models import Outbox
from .outbox import Due
from .relay import BATCH_SIZE, publish
from .runtime import Runtime

log = logging.getLogger("rexec.direct")

MAX_IN_FLIGHT = 2000
"""Rows being published at once, at most: a bulk submit faster than the broker (W5 queues
100,000 tasks) would otherwise hold every message it has not sent yet in memory. Beyond it,
new rows are due at once and the relay publishes them, 500 a round."""
SETTLE_EVERY = 0.2
"""Seconds between the transactions that clear published rows. Each is a write turn on
SQLite; one per publish took a fifth of the turns at W2's 200 tasks/s."""


class DirectPublisher:
    """Publishes what ``offer`` is given while ``run`` runs; ``lease`` is 0 when it does not,
    so that submits then leave their rows due at once, to the relay."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._tg: TaskGroup | None = None
        self._confirmed: list[int] = []
        """Outbox ids whose publish the broker confirmed: to delete."""
        self._unpublished: list[int] = []
        """Outbox ids whose publish failed: to make due now, for the relay."""
        self._settle = anyio.Event()
        self.in_flight = 0
        """Rows offered and not yet published (or failed)."""

    @property
    def lease(self) -> float:
        """0 when rows offered now would not be published: not running, or too many in flight."""
        if self._tg is None or self.in_flight >= MAX_IN_FLIGHT:
            return 0.0
        return self._rt.settings.outbox_lease

    def offer(self, rows: Sequence[Due]) -> None:
        """Publish these committed rows soon (the caller does not wait for it)."""
        if rows and self._tg is not None:
            self.in_flight += len(rows)
            self._tg.start_soon(self._publish, list(rows))

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                task_status.started()
                await self._settle_rows()
            finally:
                self._tg = None

    async def _publish(self, rows: list[Due]) -> None:
        try:
            confirmed, failure = await publish(self._rt, await self._rt.tasks_exchange(), rows)
        except Exception as exc:  # broker gone, or a bug: the relay is the backstop either way
            confirmed, failure = [], exc
        finally:
            self.in_flight -= len(rows)
        done = {due.outbox_id for due in confirmed}
        self._confirmed.extend(done)
        self._unpublished.extend(due.outbox_id for due in rows if due.outbox_id not in done)
        if failure is not None:
            log.warning(
                "could not publish new tasks at once: the relay will",
                extra={"tasks": len(rows) - len(done), "error": repr(failure)},
            )
        self._settle.set()

    async def _settle_rows(self) -> None:
        """Delete confirmed rows and make failed ones due, in one transaction for everything
        settled since the last (the next batch gathers while one is written)."""
        while True:
            await self._settle.wait()
            await anyio.sleep(SETTLE_EVERY)  # gather: the rows only have to beat their lease
            self._settle = anyio.Event()
            confirmed, self._confirmed = self._confirmed, []
            unpublished, self._unpublished = self._unpublished, []
            try:
                async with self._rt.sessions.begin() as session:
                    for chunk in _chunks(confirmed):
                        await session.execute(delete(Outbox).where(Outbox.id.in_(chunk)))
                    for chunk in _chunks(unpublished):
                        await session.execute(
                            update(Outbox)
                            .where(Outbox.id.in_(chunk))
                            .values(available_at=time.time())
                        )
            except (SQLAlchemyError, OSError) as exc:  # OSError: a refused connect (asyncpg)
                # The rows stay: the relay publishes them when their lease ends (again, for
                # the confirmed ones; agents drop those duplicates).
                log.warning(
                    "could not clear published tasks from the outbox",
                    extra={"rows": len(confirmed) + len(unpublished), "error": repr(exc)},
                )
            if unpublished:
                self._rt.wake_relay()


def _chunks(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + BATCH_SIZE] for i in range(0, len(ids), BATCH_SIZE)]
