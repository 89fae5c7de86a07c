"""Group commit: concurrent callers share one write transaction.

A single submit used to be a transaction of its own: at a few hundred requests a second the
writers queued for the database's write lock (SQLite sleeps in its busy handler while it
waits), and each paid a whole round of statements for one row. Here the first caller writes
what every caller has queued so far, in one batch, while the next callers queue behind it;
each caller returns once the batch holding its item has committed, so nothing is acknowledged
before it is durable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(eq=False)
class _Waiter(Generic[Item, Result]):
    item: Item
    woken: anyio.Event = field(default_factory=anyio.Event)
    """Set when the item's batch committed (``done``), or when this caller is to write next."""
    done: bool = False
    outcome: Result | Exception | None = None


class GroupCommit(Generic[Item, Result]):
    """Calls ``write`` with the items queued meanwhile (at most ``max_items`` at a time).

    ``write`` returns one result or exception per item, in order; if it raises, every item of
    that batch gets the error. The caller whose item heads the queue writes the next batch, so
    no caller writes for the others for longer than its own batch. A call runs shielded from
    cancellation: a caller that gives up (its client went away) still does its turn as writer
    and learns its outcome, so it never strands the others.
    """

    def __init__(
        self,
        write: Callable[[Sequence[Item]], Awaitable[Sequence[Result | Exception]]],
        *,
        max_items: int = 500,
    ) -> None:
        self._write = write
        self._max_items = max_items
        self._queued: list[_Waiter[Item, Result]] = []
        self._writing = False
        self.batches = 0
        """Batches written so far (for tests and logs)."""

    async def __call__(self, item: Item) -> Result:
        waiter: _Waiter[Item, Result] = _Waiter(item)
        self._queued.append(waiter)
        with anyio.CancelScope(shield=True):
            if self._writing:
                await waiter.woken.wait()
            if not waiter.done:  # nobody was writing, or the last writer handed over to us
                self._writing = True
                try:
                    await self._write_batch()
                finally:
                    self._hand_over()
        if isinstance(waiter.outcome, Exception):
            raise waiter.outcome
        return waiter.outcome  # type: ignore[return-value]

    async def _write_batch(self) -> None:
        batch = self._queued[: self._max_items]
        del self._queued[: self._max_items]
        try:
            outcomes: Sequence[Result | Exception] = await self._write([w.item for w in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"group commit: {len(outcomes)} outcomes for {len(batch)} items")
        except Exception as exc:
            outcomes = [exc] * len(batch)
        self.batches += 1
        for waiter, outcome in zip(batch, outcomes, strict=True):
            waiter.outcome = outcome
            waiter.done = True
            waiter.woken.set()

    def _hand_over(self) -> None:
        """The caller heading the queue writes next; with nobody queued, nobody writes."""
        if self._queued:
            self._queued[0].woken.set()
        else:
            self._writing = False
