"""The agent's task-log store: each attempt's stdout, stderr and log records, kept on this side.

Task logs stay in the execution plane: the dispatcher receives only a short tail and the
location (``log_ref``). Each line is written as ``<UTC time> <stream> <text>``, after the mask
function (secret masking) has been applied to it. An attempt's log is capped at
``REXEC_LOG_MAX_BYTES``: past the cap its lines are dropped (the tail keeps following them) and
the last line of the file says how much was dropped.

Two stores behind one small interface: a directory (the default, ``REXEC_LOG_DIR``, layout
``<pool>/<task_id>/<attempt>.log``, pruned after ``REXEC_LOG_RETENTION``), and S3-compatible
object storage (``REXEC_LOG_S3_URL``; boto3 is imported only then), which spools the running
attempt to a local file and uploads it when the attempt ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from rexec.schemas.settings import Settings

log = logging.getLogger("rexec.agent.logs")

Mask = Callable[[str], str]
TAIL_LINES = 20
TAIL_BYTES = 2048
MAX_LINE = 16 * 1024
"""Characters of one line; a longer one is cut into several."""
READ_CHUNK = 64 * 1024
PRUNE_CHUNK = 256
PRUNE_YIELD = 4.0
"""The log sweep rests four times as long as it worked: at most a fifth of a core."""
TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


class LogStoreError(Exception):
    """The log store cannot be used as configured; the text says what to do."""


def _timestamp(at: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at))
    return f"{seconds}.{int(at * 1000) % 1000:03d}Z"


def tail_of(lines: deque[str]) -> str:
    """The last lines, at most ``TAIL_BYTES`` of UTF-8, whole lines where possible."""
    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        cost = len(line.encode()) + 1
        if size + cost > TAIL_BYTES:
            if not kept:  # one huge line: keep its end
                kept.append(line.encode()[-(TAIL_BYTES - 1) :].decode(errors="ignore"))
            break
        kept.append(line)
        size += cost
    return "\n".join(reversed(kept)) + ("\n" if kept else "")


class AttemptLog:
    """One attempt's log being written: feed it chunks per stream, then ``close`` it.

    The file is made with the first line (``opener``): an attempt that says nothing and
    succeeds leaves no file at all, which spares a busy agent two filesystem operations a task
    (most of its cost for short tasks on a journaled disk)."""

    def __init__(
        self,
        opener: Callable[[], IO[bytes]],
        ref: str,
        *,
        max_bytes: int,
        mask: Mask | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ref = ref
        self.max_bytes = max_bytes
        self._opener = opener
        self._opened: IO[bytes] | None = None
        self._mask = mask
        self._clock = clock
        self._partial: dict[str, str] = {}
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.written = 0
        self.dropped_bytes = 0
        self.dropped_lines = 0
        self.closed = False

    def write(self, stream: str, text: str) -> None:
        """Add output of ``stream``; complete lines are written, a partial one waits."""
        if self.closed or not text:
            return
        pending = self._partial.pop(stream, "") + text
        *lines, rest = pending.split("\n")
        for line in lines:
            self._line(stream, line)
        if len(rest) > MAX_LINE:
            self._line(stream, rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        if rest:
            self._partial[stream] = rest
        if self._opened is not None:
            self._opened.flush()

    def note(self, text: str) -> None:
        """A line of the agent's own about the attempt (how it ended, why it was killed)."""
        self._flush_partial()
        for line in text.rstrip("\n").split("\n"):
            self._line("rexec", line)
        self._file.flush()

    @property
    def created(self) -> bool:
        """Whether anything was written, so the file exists."""
        return self._opened is not None

    @property
    def _file(self) -> IO[bytes]:
        if self._opened is None:
            self._opened = self._opener()
        return self._opened

    def _line(self, stream: str, text: str) -> None:
        for start in range(0, max(len(text), 1), MAX_LINE):
            piece = text[start : start + MAX_LINE].rstrip("\r")
            if self._mask is not None:
                piece = self._mask(piece)
            line = f"{_timestamp(self._clock())} {stream:<6} {piece}"
            self._tail.append(line)
            data = (line + "\n").encode(errors="replace")
            if self.written + len(data) > self.max_bytes:
                if not self.dropped_lines:
                    self._raw(
                        f"{_timestamp(self._clock())} rexec  log reached its limit of "
                        f"{self.max_bytes} bytes (REXEC_LOG_MAX_BYTES): further lines of "
                        "this attempt are dropped\n"
                    )
                self.dropped_bytes += len(data)
                self.dropped_lines += 1
                continue
            self._file.write(data)
            self.written += len(data)

    def _flush_partial(self) -> None:
        for stream, rest in sorted(self._partial.items()):
            self._line(stream, rest)
        self._partial.clear()

    def _raw(self, text: str) -> None:
        self._file.write(text.encode(errors="replace"))

    @property
    def tail(self) -> str:
        return tail_of(self._tail)

    def close(self) -> str:
        """Write what is left (partial lines, the drop count), close the file; the tail."""
        if self.closed:
            return self.tail
        self._flush_partial()
        if self.dropped_lines:
            self._raw(
                f"{_timestamp(self._clock())} rexec  dropped {self.dropped_lines} lines "
                f"({self.dropped_bytes} bytes) past the limit\n"
            )
        self.closed = True
        if self._opened is not None:
            self._opened.close()
        return self.tail


class LogStore(Protocol):
    """Where attempt logs live. ``open`` and ``read`` are quick local calls (``finish``, for
    object storage, uploads: the agent runs it in a worker thread)."""

    uploads: bool
    """``finish`` does blocking I/O (the agent then runs it in a worker thread)."""

    def ref(self, pool: str, task_id: str, attempt: int) -> str: ...

    def open(self, pool: str, task_id: str, attempt: int, mask: Mask | None) -> AttemptLog: ...

    def finish(self, pool: str, task_id: str, attempt: int) -> None: ...

    def read(self, pool: str, task_id: str, attempt: int, offset: int) -> bytes | None:
        """Up to ``READ_CHUNK`` bytes from ``offset``; None when there is no such log."""
        ...

    def is_open(self, pool: str, task_id: str, attempt: int) -> bool: ...

    def prune(self, now: float) -> int:
        """Remove logs past their retention; how many."""
        ...


def _key(pool: str, task_id: str, attempt: int) -> str:
    if not TASK_ID.match(task_id):
        raise ValueError(f"not a task id: {task_id!r}")
    if attempt < 1:
        raise ValueError(f"not an attempt number: {attempt}")
    return f"{pool}/{task_id}/{attempt}.log"


@dataclass
class DirLogStore:
    """``<root>/<pool>/<task_id>/<attempt>.log`` on the agent's disk."""

    root: Path
    max_bytes: int
    retention: float
    uploads = False

    def __post_init__(self) -> None:
        self._open: set[str] = set()

    def ref(self, pool: str, task_id: str, attempt: int) -> str:
        return f"dir:{_key(pool, task_id, attempt)}"

    def path(self, pool: str, task_id: str, attempt: int) -> Path:
        return self.root / _key(pool, task_id, attempt)

    def open(self, pool: str, task_id: str, attempt: int, mask: Mask | None) -> AttemptLog:
        key = _key(pool, task_id, attempt)
        self._open.add(key)
        return _start(
            self.path(pool, task_id, attempt),
            self.ref(pool, task_id, attempt),
            self.max_bytes,
            mask,
            on_close=lambda: self._open.discard(key),
        )

    def finish(self, pool: str, task_id: str, attempt: int) -> None:
        return None

    def read(self, pool: str, task_id: str, attempt: int, offset: int) -> bytes | None:
        try:
            with self.path(pool, task_id, attempt).open("rb") as file:
                file.seek(offset)
                return file.read(READ_CHUNK)
        except FileNotFoundError:
            return None

    def is_open(self, pool: str, task_id: str, attempt: int) -> bool:
        return _key(pool, task_id, attempt) in self._open

    def prune(self, now: float) -> int:
        """Runs in a worker thread, unhurried: a busy agent keeps hundreds of thousands of
        logs, and a sweep at full speed would hold the interpreter lock away from the event
        loop for seconds. So it pauses after each ``PRUNE_CHUNK`` logs, for ``PRUNE_YIELD``
        times as long as they took. Logs still being written are left alone."""
        removed = 0
        cutoff = now - self.retention
        chunk_started, looked = time.monotonic(), 0
        for path in self.root.glob("*/*/*.log"):
            looked += 1
            if looked % PRUNE_CHUNK == 0:
                time.sleep(PRUNE_YIELD * (time.monotonic() - chunk_started))
                chunk_started = time.monotonic()
            if path.relative_to(self.root).as_posix() in self._open:
                continue
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
                    with contextlib.suppress(OSError):
                        path.parent.rmdir()  # only when empty
        return removed


class _Tracked(AttemptLog):
    def __init__(self, *args: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    def close(self) -> str:
        try:
            return super().close()
        finally:
            self._on_close()


def _start(
    path: Path, ref: str, max_bytes: int, mask: Mask | None, on_close: Callable[[], None]
) -> AttemptLog:
    """A new attempt log to be written to ``path`` (made, with its directories, on the first
    line)."""

    def opener() -> IO[bytes]:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("wb")

    return _Tracked(opener, ref, max_bytes=max_bytes, mask=mask, on_close=on_close)


class S3LogStore:
    """Object storage (S3 or compatible): ``s3://bucket/prefix/<pool>/<task_id>/<attempt>.log``.

    The running attempt is spooled to a local file (so it can be followed); ``finish`` uploads
    it and removes the spool. Retention is the bucket's lifecycle rule, not the agent's.
    """

    uploads = True

    def __init__(self, url: str, max_bytes: int, client: Any = None) -> None:
        match = re.match(r"^s3://([^/]+)/?(.*)$", url)
        if not match:
            raise LogStoreError(f"REXEC_LOG_S3_URL must look like s3://bucket/prefix, not {url!r}")
        self.bucket = match.group(1)
        self.prefix = match.group(2).strip("/")
        self.max_bytes = max_bytes
        if client is None:
            try:
                import boto3  # type: ignore[import-not-found, unused-ignore]
            except ImportError:
                raise LogStoreError(
                    "REXEC_LOG_S3_URL is set but boto3 is not installed: "
                    "pip install 'rexec[s3]' (or unset REXEC_LOG_S3_URL to log to REXEC_LOG_DIR)"
                ) from None
            client = boto3.client("s3")
        self._client = client
        self._spool = Path(tempfile.mkdtemp(prefix="rexec-log-spool-"))
        self._open: set[str] = set()

    def _object(self, pool: str, task_id: str, attempt: int) -> str:
        key = _key(pool, task_id, attempt)
        return f"{self.prefix}/{key}" if self.prefix else key

    def ref(self, pool: str, task_id: str, attempt: int) -> str:
        return f"s3://{self.bucket}/{self._object(pool, task_id, attempt)}"

    def _spooled(self, pool: str, task_id: str, attempt: int) -> Path:
        return self._spool / _key(pool, task_id, attempt)

    def open(self, pool: str, task_id: str, attempt: int, mask: Mask | None) -> AttemptLog:
        self._open.add(_key(pool, task_id, attempt))  # until ``finish`` has uploaded it
        return _start(
            self._spooled(pool, task_id, attempt),
            self.ref(pool, task_id, attempt),
            self.max_bytes,
            mask,
            on_close=lambda: None,
        )

    def finish(self, pool: str, task_id: str, attempt: int) -> None:
        path = self._spooled(pool, task_id, attempt)
        if not path.exists():  # a silent success: nothing to keep
            self._open.discard(_key(pool, task_id, attempt))
            return
        try:
            self._client.upload_file(str(path), self.bucket, self._object(pool, task_id, attempt))
            path.unlink(missing_ok=True)
        except Exception as exc:  # the spool stays readable; say so once
            log.error(
                "could not upload the attempt's log; it stays in the local spool",
                extra={
                    "task_id": task_id,
                    "attempt": attempt,
                    "path": str(path),
                    "error": str(exc),
                },
            )
        finally:
            self._open.discard(_key(pool, task_id, attempt))

    def read(self, pool: str, task_id: str, attempt: int, offset: int) -> bytes | None:
        path = self._spooled(pool, task_id, attempt)
        if path.exists():
            with path.open("rb") as file:
                file.seek(offset)
                return file.read(READ_CHUNK)
        try:
            answer = self._client.get_object(
                Bucket=self.bucket,
                Key=self._object(pool, task_id, attempt),
                Range=f"bytes={offset}-{offset + READ_CHUNK - 1}",
            )
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                return None
            if code == "InvalidRange":
                return b""
            raise
        data: bytes = answer["Body"].read()
        return data

    def is_open(self, pool: str, task_id: str, attempt: int) -> bool:
        return _key(pool, task_id, attempt) in self._open

    def prune(self, now: float) -> int:
        return 0

    def close(self) -> None:
        shutil.rmtree(self._spool, ignore_errors=True)


def open_store(settings: Settings) -> LogStore:
    if settings.log_s3_url:
        return S3LogStore(settings.log_s3_url, settings.log_max_bytes)
    root = Path(settings.log_dir).expanduser()
    problem = _unwritable(root)
    if problem and settings.log_dir == DEFAULT_LOG_DIR:
        # Not chosen by the operator (a read-only working directory, as in the Helm chart):
        # the temporary directory, which such containers mount writable, rather than no agent.
        fallback = Path(tempfile.gettempdir()) / DEFAULT_LOG_DIR
        if not _unwritable(fallback):
            log.warning(
                "task log directory not writable; using the temporary directory instead "
                "(set REXEC_LOG_DIR to choose)",
                extra={"wanted": str(root), "problem": problem, "log_dir": str(fallback)},
            )
            root, problem = fallback, ""
    if problem:
        raise LogStoreError(
            f"cannot use the task log directory {str(root)!r} ({problem}): "
            "set REXEC_LOG_DIR to a writable directory"
        )
    return DirLogStore(root.resolve(), settings.log_max_bytes, settings.log_retention)


DEFAULT_LOG_DIR = Settings().log_dir


def _unwritable(root: Path) -> str:
    """Why the agent cannot keep logs in ``root`` (empty: it can)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return str(exc.strerror or exc)
    if not os.access(root, os.W_OK):
        return "not writable"
    return ""
