"""A fixed pool of persistent child processes that run function tasks.

Starting Python costs tens of milliseconds, so children live across tasks (command tasks run
in them too). A child that is interrupted mid-call (timeout, cancel, lease lost, shutdown) is
stopped: SIGTERM, on which it stops everything it started (its subreaper sees what left its
session or parent) within ``grace`` seconds and exits; SIGKILL of what is left if it does not.
The call returns only then, so a stopped attempt is gone when its end is reported. A stopped or
dead child is replaced in the background, so the pool always returns to full size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable

import anyio
from anyio.abc import ByteReceiveStream, Process, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import protocol, reaper
from .environment import task_environment
from .secrets.masking import Masker

log = logging.getLogger("rexec.agent.children")

_RESPAWN_BACKOFF_MAX = 5.0
_STOP_MARGIN = 2.0
"""Seconds past the grace a stopped child has to exit before the agent SIGKILLs what is left."""
_OUTPUT_LINE_MAX = 64 * 1024
"""A task's output is forwarded in lines (so a secret is never split across two masked
pieces); a longer run without a newline is forwarded in pieces of this size."""

Sink = Callable[[str, str], None]
"""Receives a running call's output: ``(stream, text)``."""


class ChildDied(Exception):
    """The child exited (or closed its pipes) while it ran a call."""


class Child:
    """One child process and its frame pipes."""

    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self._stdin = process.stdin
        self._stdout = BufferedByteReceiveStream(process.stdout)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def call(self, call: protocol.Call, sink: Sink | None = None) -> protocol.Outcome:
        """Send the call; pass its output frames to ``sink`` until its outcome arrives."""
        try:
            await self._stdin.send(protocol.frame(call))
            while True:
                header = await self._stdout.receive_exactly(protocol.HEADER_BYTES)
                body = await self._stdout.receive_exactly(protocol.frame_length(header))
                frame = protocol.outcome_decoder.decode(body)
                if isinstance(frame, protocol.Outcome):
                    return frame
                if sink is not None:
                    sink(frame.stream, frame.text)
                else:
                    sys.stderr.write(frame.text)
        except (
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            anyio.EndOfStream,
            anyio.IncompleteRead,
            OSError,
        ) as exc:
            raise ChildDied(str(exc) or type(exc).__name__) from None

    def terminate(self) -> None:
        """Ask the child to stop its call and all it started (SIGTERM), then exit."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.process.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the child, its process group and everything below it now (no await, so it
        is safe while cancelled): the last resort when it does not stop on SIGTERM."""
        if self.process.returncode is None:
            reaper.kill_tree(self.process.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def stop(self, grace: float) -> int | None:
        """Terminate, wait for the child's exit (``grace`` and a margin), kill it, reap it."""
        self.terminate()
        with anyio.move_on_after(grace + _STOP_MARGIN, shield=True):
            await self.process.wait()
        if self.process.returncode is None:
            log.warning(
                "child did not stop on SIGTERM; killing it and what it started",
                extra={"pid": self.pid, "grace": grace},
            )
            self.kill()
        return await self.reap()

    async def reap(self) -> int | None:
        with anyio.CancelScope(shield=True):
            code = await self.process.wait()
            with contextlib.suppress(Exception):
                await self.process.aclose()
        return code


class ChildPool:
    """Hands out idle children; ``call`` runs one call in one of them, cancellation-safe."""

    def __init__(
        self,
        size: int,
        max_result_bytes: int,
        task_group: TaskGroup,
        *,
        masker: Masker | None = None,
        hidden_env: Iterable[str] = (),
        preload: Iterable[str] = (),
        grace: float = reaper.DEFAULT_GRACE,
    ) -> None:
        self.size = size
        self.grace = grace
        """Seconds a stopped call's processes have between SIGTERM and SIGKILL."""
        self.preload = tuple(preload)
        self.max_result_bytes = max_result_bytes
        self.masker = masker if masker is not None else Masker()
        self.hidden_env = tuple(hidden_env)
        self._tg = task_group
        send, receive = anyio.create_memory_object_stream[Child](size)
        self._idle_send: MemoryObjectSendStream[Child] = send
        self._idle_receive: MemoryObjectReceiveStream[Child] = receive
        self._all: set[Child] = set()
        self._closing = False

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-P",  # neither the working directory nor a customer's package shadows rexec
            "-m",
            "rexec.worker.child",
            "--max-result-bytes",
            str(self.max_result_bytes),
            "--parent",
            str(os.getpid()),
            "--grace",
            str(self.grace),
            *(f"--preload={module}" for module in self.preload),
        ]

    def _env(self) -> dict[str, str]:
        return task_environment(hidden_prefixes=self.hidden_env)

    async def spawn(self) -> Child:
        process = await anyio.open_process(
            self.argv(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._env(),
            start_new_session=True,
        )
        assert process.stderr is not None
        self._tg.start_soon(self._forward_output, process.stderr)
        child = Child(process)
        self._all.add(child)
        log.debug("child started", extra={"pid": child.pid})
        return child

    async def _forward_output(self, stream: ByteReceiveStream) -> None:
        """The task's prints (the child's stderr) go to the agent's stderr, masked."""
        pending = bytearray()
        try:
            async for chunk in stream:
                pending += chunk
                cut = pending.rfind(b"\n") + 1
                if not cut and len(pending) >= _OUTPUT_LINE_MAX:
                    cut = len(pending)
                if cut:
                    self._write_output(bytes(pending[:cut]))
                    del pending[:cut]
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            if pending:
                self._write_output(bytes(pending))

    def _write_output(self, data: bytes) -> None:
        text = self.masker.mask(data.decode(errors="replace"))
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(text)
            sys.stderr.flush()

    async def start(self) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(self.size):
                tg.start_soon(self._add_new)

    async def _add_new(self) -> None:
        delay = 0.1
        while not self._closing:
            try:
                child = await self.spawn()
            except OSError as exc:
                log.error("cannot start a child process", extra={"error": str(exc)})
                await anyio.sleep(delay)
                delay = min(delay * 2, _RESPAWN_BACKOFF_MAX)
                continue
            self._idle_send.send_nowait(child)
            return

    async def call(self, call: protocol.Call, sink: Sink | None = None) -> protocol.Outcome:
        """Run ``call`` in an idle child. On cancellation the child is stopped (with all it
        started) before this returns, and replaced."""
        child = await self._idle_receive.receive()
        while child.process.returncode is not None:  # died while idle (OOM killer, ...)
            log.warning("idle child had exited; replacing it", extra={"pid": child.pid})
            self._replace(child)
            child = await self._idle_receive.receive()
        healthy = False
        try:
            outcome = await child.call(call, sink)
            healthy = True
            return outcome
        except ChildDied as exc:
            code = None
            with anyio.move_on_after(1.0, shield=True):
                code = await child.process.wait()
            raise ChildDied(_describe_exit(code, str(exc))) from None
        finally:
            if healthy:
                self._idle_send.send_nowait(child)
            else:
                self._all.discard(child)
                with anyio.CancelScope(shield=True):
                    code = await child.stop(self.grace)
                log.info(
                    "child stopped with everything its call started; replacing it",
                    extra={"pid": child.pid, "exit_code": code},
                )
                self._tg.start_soon(self._add_new)

    def _replace(self, child: Child) -> None:
        child.kill()
        self._all.discard(child)
        self._tg.start_soon(self._reap_and_respawn, child)

    async def _reap_and_respawn(self, child: Child) -> None:
        code = await child.reap()
        log.debug("child replaced", extra={"pid": child.pid, "exit_code": code})
        await self._add_new()

    async def aclose(self) -> None:
        """Close the children's stdin (they exit), then stop any that linger."""
        self._closing = True
        children = list(self._all)
        self._all.clear()
        for child in children:
            with contextlib.suppress(Exception):
                await child.process.stdin.aclose()  # type: ignore[union-attr]
        with anyio.move_on_after(2.0, shield=True):
            for child in children:
                await child.process.wait()
        async with anyio.create_task_group() as tg:
            for child in children:
                tg.start_soon(child.stop, self.grace)


def _describe_exit(code: int | None, detail: str) -> str:
    if code is None:
        return f"the child process running the task stopped answering ({detail})"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the child process running the task was killed by {name}"
    return f"the child process running the task exited with code {code}"


@contextlib.asynccontextmanager
async def open_child_pool(
    size: int,
    max_result_bytes: int,
    *,
    masker: Masker | None = None,
    hidden_env: Iterable[str] = (),
    preload: Iterable[str] = (),
    grace: float = reaper.DEFAULT_GRACE,
) -> AsyncIterator[ChildPool]:
    """A started pool; every child is gone when the block exits."""
    async with anyio.create_task_group() as tg:
        pool = ChildPool(
            size,
            max_result_bytes,
            tg,
            masker=masker,
            hidden_env=hidden_env,
            preload=preload,
            grace=grace,
        )
        try:
            await pool.start()
            yield pool
        finally:
            await pool.aclose()
            tg.cancel_scope.cancel()
