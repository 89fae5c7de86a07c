"""``rexec-agent`` announcing another protocol version (``REXEC_TEST_PROTOCOL=major.minor``):
what an agent of an older or newer release says at registration. Announcing 1.1 it also
refuses task batches, as a 1.1 agent's strict decoder does, so a batch sent to it is noticed."""

from __future__ import annotations

import os
import sys

from rexec.schemas import messages
from rexec.worker import cli, handler


def _decode_without_batches(
    body: bytes, batched: bool
) -> tuple[list[messages.TaskMessage], list[str]]:
    return [messages.decode_task(body)], []


if __name__ == "__main__":
    major, _, minor = os.environ["REXEC_TEST_PROTOCOL"].partition(".")
    messages.PROTOCOL_VERSION, messages.PROTOCOL_MINOR = int(major), int(minor)
    if messages.PROTOCOL_MINOR < messages.BATCHES_FROM_MINOR:
        handler.decode = _decode_without_batches
    sys.exit(cli.main())
