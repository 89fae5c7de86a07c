"""Frames between the agent and its child processes: a 4-byte length, then a JSON body.

JSON (not pickle) keeps the boundary honest: a task's arguments and result are exactly what
crosses the wire anyway. The result travels as raw JSON so the agent never re-encodes it.
"""

from __future__ import annotations

from typing import Any

import msgspec

HEADER_BYTES = 4
MAX_FRAME_BYTES = 1 << 30
TRACEBACK_TAIL = 4096
"""Characters of a traceback or a command's output kept in an event."""


class Call(msgspec.Struct, frozen=True, kw_only=True):
    """Run ``target`` (``module:function``) with these arguments, or, when ``argv`` is set,
    that command (in ``env``): the child, a subreaper, then stops whatever it spawned."""

    target: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    secrets: dict[str, str] = {}
    """The values of the secrets the task named, for ``rexec.worker.context.secret`` during the call;
    they travel only over the private pipe to the child."""
    argv: list[str] = []
    env: dict[str, str] | None = None
    """A command's whole environment (the secrets it named included); None: the child's."""


class Outcome(msgspec.Struct, frozen=True, kw_only=True, tag="outcome"):
    """How an attempt ended: a JSON result, or an error the dispatcher can act on."""

    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"null")
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    retryable: bool = True


class Output(msgspec.Struct, frozen=True, kw_only=True, tag="output"):
    """Output of the running call (``stdout``, ``stderr`` or ``log`` records), sent before its
    ``Outcome`` on the same pipe, so the agent has all of it when the outcome arrives."""

    stream: str
    text: str


def success(result_json: bytes) -> Outcome:
    return Outcome(ok=True, result=msgspec.Raw(result_json))


def failure(error_type: str, message: str, traceback: str = "", retryable: bool = True) -> Outcome:
    return Outcome(
        ok=False,
        error_type=error_type,
        message=message,
        traceback=traceback[-TRACEBACK_TAIL:],
        retryable=retryable,
    )


_encoder = msgspec.json.Encoder()
call_decoder = msgspec.json.Decoder(Call)
outcome_decoder = msgspec.json.Decoder(Outcome | Output)


def frame(message: Call | Outcome | Output) -> bytes:
    body = _encoder.encode(message)
    return len(body).to_bytes(HEADER_BYTES, "big") + body


def frame_length(header: bytes) -> int:
    size = int.from_bytes(header, "big")
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return size
