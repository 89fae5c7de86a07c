"""The child's output capture on its own (no broker): a call's output, and only its own."""

from __future__ import annotations

import pytest

from rexec.worker import protocol
from rexec.worker.children import open_child_pool

pytestmark = pytest.mark.anyio


async def test_each_call_gets_its_own_output_in_order_and_nothing_is_left_behind() -> None:
    async with open_child_pool(1, 1 << 20) as pool:
        for name in ("one", "two"):
            seen: list[tuple[str, str]] = []
            outcome = await pool.call(
                protocol.Call(target="tests.tasks:chatty", args=[name]),
                lambda stream, text, seen=seen: seen.append((stream, text)),
            )
            assert outcome.ok
            joined = {
                s: "".join(t for st, t in seen if st == s) for s in ("stdout", "stderr", "log")
            }
            assert joined["stdout"] == (
                f"out {name} 0\nout {name} 1\nout {name} 2\nsub-out {name}\nno newline at the end"
            )
            assert joined["stderr"] == f"err {name}\nsub-err {name}\n"
            assert joined["log"] == (
                f"INFO tests.chatty: logged {name}\nWARNING tests.chatty: warned {name}\n"
            )


async def test_a_call_without_a_sink_still_returns_and_the_next_one_is_clean() -> None:
    async with open_child_pool(1, 1 << 20) as pool:
        first = await pool.call(protocol.Call(target="tests.tasks:flood", args=[2000]))
        assert first.ok
        seen: list[str] = []
        second = await pool.call(
            protocol.Call(target="tests.tasks:add", args=[1, 2]),
            lambda stream, text: seen.append(text),
        )
        assert second.ok and bytes(second.result) == b"3" and seen == []
