"""``rexec-agent`` announcing another protocol version (``REXEC_TEST_PROTOCOL=major.minor``):
what an agent of an older or newer release says at registration."""

from __future__ import annotations

import os
import sys

from schemas import messages
from worker import cli

if __name__ == "__main__":
    major, _, minor = os.environ["REXEC_TEST_PROTOCOL"].partition(".")
    messages.PROTOCOL_VERSION, messages.PROTOCOL_MINOR = int(major), int(minor)
    sys.exit(cli.main())
