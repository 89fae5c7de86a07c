"""GroupCommit: callers that arrive while a batch is written share the next one."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from rexec.dispatcher.groupcommit import GroupCommit

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_callers_queued_behind_a_write_share_the_next_batch() -> None:
    written: list[list[int]] = []
    release = anyio.Event()

    async def write(items: Sequence[int]) -> list[int | Exception]:
        written.append(list(items))
        if len(written) == 1:
            await release.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    group: GroupCommit[int, int] = GroupCommit(write)
    results: dict[int, int | str] = {}

    async def call(item: int) -> None:
        try:
            results[item] = await group(item)
        except ValueError as exc:
            results[item] = str(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, 0)
        await anyio.wait_all_tasks_blocked()
        given_up = anyio.CancelScope()

        async def impatient() -> None:
            with given_up:
                await call(1)

        tg.start_soon(impatient)
        for item in range(2, 6):
            tg.start_soon(call, item)
        await anyio.wait_all_tasks_blocked()
        given_up.cancel()  # its client went away: its item is still written, nobody stalls
        release.set()
    assert written == [[0], [1, 2, 3, 4, 5]]
    assert results == {0: 0, 1: "odd 1", 2: 20, 3: "odd 3", 4: 40, 5: "odd 5"}
    assert group.batches == 2


async def test_a_failed_write_fails_its_batch_only() -> None:
    calls = 0

    async def write(items: Sequence[str]) -> list[str | Exception]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database gone")
        return list(items)

    group: GroupCommit[str, str] = GroupCommit(write)
    with pytest.raises(ConnectionError, match="database gone"):
        await group("a")
    assert await group("b") == "b"
