"""A persistent child process that runs function tasks for the agent (``python -m rexec.worker.child``).

The agent keeps a few of these alive and sends them one call at a time over stdin/stdout, so
a task costs a pipe round trip rather than a Python start-up. Command tasks run here too, for
the same reason. The agent stops a child (SIGTERM) to stop a task (timeout, cancel, lease
lost) and starts a fresh one. A child is a subreaper that also hears its agent die: on either
it stops everything below it, whatever session or parent it moved to (SIGTERM, a grace, then
SIGKILL), and exits; after each call it does the same to what the call left behind. The real
stdout is kept private for frames. While a call runs, the task's stdout, stderr (file descriptors 1 and 2, so the
output of subprocesses it starts too) and its ``logging`` records are captured and sent to the
agent as ``Output`` frames ahead of the call's ``Outcome``; between calls they go to the
agent's stderr as before.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import importlib
import inspect
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import msgspec

from . import context, protocol, reaper
from .command import start_failure

_json = msgspec.json.Encoder()
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


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

    def preload(self, modules: list[str]) -> None:
        """Import the task modules before the first call. A module that fails is left for
        its first task to import again and report (it may need that task's secrets)."""
        for module in modules:
            try:
                importlib.import_module(module)
            except BaseException as exc:
                print(
                    f"rexec child: could not preload {module!r} ({type(exc).__name__}: {exc}); "
                    "its first task imports it again",
                    file=sys.stderr,
                    flush=True,
                )

    def run(self, call: protocol.Call) -> protocol.Outcome:
        if call.argv:
            return run_command(call)
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
    retryable = not isinstance(exc, context.NonRetryable)
    return protocol.failure(type(exc).__name__, str(exc), text, retryable=retryable)


def run_command(call: protocol.Call) -> protocol.Outcome:
    """Run a command task with our fds 1 and 2 (captured as its ``stdout`` and ``stderr``).

    The result is the bare exit code; the agent, which has the output, builds the outcome."""
    try:
        # A session of its own, as before: a script's ``kill 0`` must not reach this child.
        process = subprocess.Popen(
            call.argv, stdin=subprocess.DEVNULL, env=call.env, start_new_session=True
        )
    except (OSError, ValueError) as exc:
        return start_failure(call.argv, exc)
    return protocol.success(_json.encode(process.wait()))


class Guard:
    """Stops everything below this child, then exits, when the agent dies or asks (SIGTERM).

    A SIGKILLed agent can clean up nothing, so the child must: ``PR_SET_PDEATHSIG`` (SIGTERM)
    tells it, and a check of the parent every ``POLL`` seconds backs that up in case a task
    changed the signal's handling. A thread does the work, so a task busy in the main thread
    does not delay it; the SIGTERM reaches that thread through the signal wakeup fd.
    """

    POLL = 0.5

    def __init__(self, parent: int, grace: float) -> None:
        self.parent = parent
        self.grace = grace

    def install(self) -> None:
        reaper.become_subreaper()
        reaper.set_parent_death_signal(signal.SIGTERM)
        # After the prctl, not before: the agent may have died already, and then no signal comes.
        if self.parent and os.getppid() != self.parent:
            self.stop()
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        signal.set_wakeup_fd(write_end)
        os.register_at_fork(after_in_child=_forget_guard)
        threading.Thread(
            target=self._watch, args=(read_end,), name="rexec-guard", daemon=True
        ).start()

    def _watch(self, wakeup: int) -> None:
        while True:
            ready, _, _ = select.select([wakeup], [], [], self.POLL)
            if ready and signal.SIGTERM in os.read(wakeup, 512):
                self.stop()
            if self.parent and os.getppid() != self.parent:
                self.stop()

    def stop(self) -> None:
        reaper.terminate_descendants(self.grace)
        os._exit(128 + signal.SIGTERM)


def _forget_guard() -> None:
    """A task's forked process must not wake the guard: its SIGTERM is its own."""
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _private_pipes() -> tuple[int, int]:
    """Keep the frame pipes for ourselves; the task sees /dev/null and stderr instead."""
    frames_in = os.dup(0)
    frames_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return frames_in, frames_out


class Capture:
    """Pipes behind fds 1 and 2, pumped by a thread into ``Output`` frames while a call runs.

    Frames are written under one lock, so output and outcome never interleave mid-frame. The
    pump reads only while it holds the pump lock; ``sync`` (after the call) takes that lock and
    drains what is left in the pipes itself, so the call's output is all framed before its
    outcome, at the cost of two non-blocking reads.
    """

    def __init__(self, frames_out: int) -> None:
        self._frames_out = frames_out
        self._lock = threading.Lock()
        self._pump_lock = threading.Lock()
        self._passthrough = os.dup(2)  # the agent's stderr, for output between calls
        self.active = False
        self._streams: dict[int, str] = {}
        self._decoders: dict[int, codecs.IncrementalDecoder] = {}
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            os.set_blocking(read_end, False)
            self._streams[read_end] = stream
            self._decoders[read_end] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        threading.Thread(target=self._pump, name="rexec-output", daemon=True).start()
        handler = _FrameHandler(self)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)

    def send(self, stream: str, text: str) -> None:
        if not text:
            return
        with self._lock:
            if self.active:
                frame = protocol.frame(protocol.Output(stream=stream, text=text))
                _write_all(self._frames_out, frame)
            else:
                with contextlib.suppress(OSError):
                    _write_all(self._passthrough, text.encode(errors="replace"))

    def begin(self) -> None:
        """A call starts: output left over from between calls goes to the agent's stderr."""
        self.sync()
        with self._lock:
            self.active = True

    def send_outcome(self, outcome: protocol.Outcome) -> None:
        with self._lock:
            self.active = False
            _write_all(self._frames_out, protocol.frame(outcome))

    def sync(self) -> None:
        """Everything the call wrote so far is framed when this returns."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        with self._pump_lock:
            for fd in self._streams:
                self._drain(fd, final=True)

    def _drain(self, fd: int, *, final: bool = False) -> bool:
        """Frame what the pipe holds now (pump lock held); False once its write ends closed."""
        decoder, stream = self._decoders[fd], self._streams[fd]
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                return False
            if not chunk:
                return False
            self.send(stream, decoder.decode(chunk))
        if final:
            self.send(stream, decoder.decode(b"", final=True))
        return True

    def _pump(self) -> None:
        open_fds = list(self._streams)
        while open_fds:
            try:
                ready, _, _ = select.select(open_fds, [], [])
            except OSError:
                return
            with self._pump_lock:
                for fd in ready:
                    if not self._drain(fd):
                        open_fds.remove(fd)


class _FrameHandler(logging.Handler):
    """The task's ``logging`` records, as the ``log`` stream of its attempt."""

    def __init__(self, capture: Capture) -> None:
        super().__init__(logging.NOTSET)
        self._capture = capture

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._capture.send("log", self.format(record) + "\n")
        except Exception:
            self.handleError(record)


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


def serve(frames_in: int, capture: Capture, runner: Runner, grace: float) -> None:
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
            capture.begin()
            outcome = runner.run(call)
            reaper.terminate_descendants(grace)  # what the call left running ends with it
            capture.sync()
        capture.send_outcome(outcome)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rexec.worker.child")
    parser.add_argument("--max-result-bytes", type=int, default=256 * 1024)
    parser.add_argument("--parent", type=int, default=0)
    parser.add_argument("--preload", action="append", default=[], metavar="MODULE")
    parser.add_argument("--grace", type=float, default=reaper.DEFAULT_GRACE)
    options = parser.parse_args(argv)
    Guard(options.parent, options.grace).install()
    # Not SIG_IGN: an ignored signal stays ignored across exec, in every command run here.
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    frames_in, frames_out = _private_pipes()
    runner = Runner(options.max_result_bytes)
    runner.preload(options.preload)
    serve(frames_in, Capture(frames_out), runner, options.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
