"""Structured logs for both planes: one JSON object per line on stderr, so operators can grep
by task, attempt or agent."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    """Event name in ``event``; everything passed in ``extra=`` becomes a top-level field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        try:
            return _encoder.encode(entry).decode(errors="replace")
        except (TypeError, msgspec.EncodeError):
            return _encoder.encode({k: str(v) for k, v in entry.items()}).decode(errors="replace")


QUIET = ("aio_pika", "aiormq", "httpx", "httpcore", "uvicorn", "alembic")
"""Libraries whose info-level chatter would drown rexec's own events."""


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.Formatter.converter = time.gmtime
    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)
