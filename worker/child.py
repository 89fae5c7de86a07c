"""A persistent child process that runs function tasks for the agent (``python -m worker.child``).

The agent keeps a few of these alive and sends them one call at a time over stdin/stdout, so
a task costs a pipe round trip rather than a Python start-up. The agent kills a child to stop
a task (timeout, cancel, lease lost) and starts a fresh one. The task's own prints go to
stderr: the real stdout is kept private for frames.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib
import inspect
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import msgspec

from . import context, protocol

PR_SET_PDEATHSIG = 1

_json = msgspec.json.Encoder()


class TargetNotFound(Exception):
    """The target is not ``module:function`` or does not resolve to something callable."""


class Runner:
    """Resolves targets (imports are cached) and turns each call into an ``Outcome``."""

    def __init__(self, max_result_bytes: int) -> None:
        self.max_result_bytes = max_result_bytes
        self._targets: dict[str, Callable[..., Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def resolve(self, target: str) -> Callable[..., Any]:
        cached = self._targets.get(target)
        if cached is not None:
            return cached
        module_name, sep, attribute = target.partition(":")
        if not sep or not module_name or not attribute:
            raise TargetNotFound(f"target {target!r} is not of the form 'module:function'")
        try:
            found: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise TargetNotFound(f"cannot import module {module_name!r}: {exc}") from None
        for part in attribute.split("."):
            try:
                found = getattr(found, part)
            except AttributeError:
                raise TargetNotFound(
                    f"module {module_name!r} has no attribute {attribute!r}"
                ) from None
        if not callable(found):
            raise TargetNotFound(f"{target!r} is not callable")
        self._targets[target] = found
        return found  # type: ignore[no-any-return]

    def run(self, call: protocol.Call) -> protocol.Outcome:
        context._bind(call.secrets)
        try:
            return self._run(call)
        finally:
            context._clear()

    def _run(self, call: protocol.Call) -> protocol.Outcome:
        try:
            function = self.resolve(call.target)
        except TargetNotFound as exc:
            return protocol.failure("TargetNotFound", str(exc), retryable=False)
        except BaseException as exc:  # the module's own import-time code failed
            return _exception_outcome(exc)
        try:
            value = function(*call.args, **call.kwargs)
            if inspect.isawaitable(value):
                value = self._event_loop().run_until_complete(_await(value))
        except BaseException as exc:
            return _exception_outcome(exc)
        return self._encode_result(value)

    def _encode_result(self, value: object) -> protocol.Outcome:
        try:
            encoded = _json.encode(value)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            return protocol.failure(
                "ResultNotSerializable",
                f"the result ({type(value).__name__}) cannot be encoded as JSON: {exc}",
                retryable=False,
            )
        if len(encoded) > self.max_result_bytes:
            return protocol.failure(
                "ResultTooLarge",
                f"the result is {len(encoded)} bytes of JSON, over the limit of "
                f"{self.max_result_bytes} (REXEC_MAX_RESULT_BYTES); store large results "
                "elsewhere and return a reference",
                retryable=False,
            )
        return protocol.success(encoded)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """One loop for the child's life: coroutine tasks cost no loop set-up each."""
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
        return self._loop


async def _await(value: Any) -> Any:
    return await value


def _exception_outcome(exc: BaseException) -> protocol.Outcome:
    # Drop the runner's own frame: the user wants to see their code.
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return protocol.failure(type(exc).__name__, str(exc), text, retryable=True)


def _die_with_parent(parent: int) -> None:
    """Linux: get SIGKILL when the agent dies, so a killed agent leaves no task running."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if parent and os.getppid() != parent:
        os._exit(0)


def _private_pipes() -> tuple[int, int]:
    """Keep the frame pipes for ourselves; the task sees /dev/null and stderr instead."""
    frames_in = os.dup(0)
    frames_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return frames_in, frames_out


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = os.read(fd, size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def serve(frames_in: int, frames_out: int, runner: Runner) -> None:
    while True:
        header = _read_exactly(frames_in, protocol.HEADER_BYTES)
        if header is None:
            return
        body = _read_exactly(frames_in, protocol.frame_length(header))
        if body is None:
            return
        try:
            call = protocol.call_decoder.decode(body)
        except msgspec.DecodeError as exc:
            outcome = protocol.failure("BadCall", f"malformed call frame: {exc}", retryable=False)
        else:
            outcome = runner.run(call)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        _write_all(frames_out, protocol.frame(outcome))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.child")
    parser.add_argument("--max-result-bytes", type=int, default=256 * 1024)
    parser.add_argument("--parent", type=int, default=0)
    options = parser.parse_args(argv)
    _die_with_parent(options.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    frames_in, frames_out = _private_pipes()
    serve(frames_in, frames_out, Runner(options.max_result_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
