"""Command tasks: run an argv in its own process group and keep the tail of its output.

stdout and stderr are read from separate pipes, so the attempt's log (``sink``) can tell them
apart; the result's ``output`` tail is both, in the order the chunks arrived.

The process group lets the agent kill the command together with anything it started, which
is what a timeout or a cancel must do. The secrets the task named are in its environment, each
under its own name; the output tail that goes back is masked by the agent's ``Reporter``.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping

import anyio
import anyio.abc
import msgspec

from . import protocol
from .environment import task_environment

OUTPUT_TAIL = protocol.TRACEBACK_TAIL

_json = msgspec.json.Encoder()


Sink = Callable[[str, str], None]


async def run_command(
    argv: list[str], sink: Sink | None = None, *, env: Mapping[str, str] | None = None
) -> protocol.Outcome:
    """Run to completion; on cancellation (timeout, cancel) kill the whole group first.

    ``sink`` gets each line of output with its stream; ``env`` is the environment (default:
    the agent's, minus its credentials)."""
    try:
        process = await anyio.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=dict(env) if env is not None else task_environment(),
        )
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        return protocol.failure(
            "TargetNotFound",
            f"cannot run command {argv[0]!r}: {exc.strerror or exc}",
            retryable=False,
        )
    tail = bytearray()
    finished = False

    async def pump(stream: anyio.abc.ByteReceiveStream, name: str) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async for chunk in stream:
            tail.extend(chunk)
            if len(tail) > OUTPUT_TAIL:
                del tail[: len(tail) - OUTPUT_TAIL]
            if sink is not None:
                sink(name, decoder.decode(chunk))
        if sink is not None:
            sink(name, decoder.decode(b"", final=True))

    try:
        assert process.stdout is not None and process.stderr is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, process.stdout, "stdout")
            tg.start_soon(pump, process.stderr, "stderr")
        code = await process.wait()
        finished = True
    finally:
        if not finished:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        with anyio.CancelScope(shield=True):
            await process.wait()
            with contextlib.suppress(Exception):
                await process.aclose()
    output = tail.decode(errors="replace")
    if code != 0:
        return protocol.failure(
            "CommandFailed", f"exit code {code}", traceback=output, retryable=True
        )
    return protocol.success(_json.encode({"exit_code": code, "output": output}))
