"""The task used by ``bench.failover``: its first attempt hangs, a retry returns at once."""

from __future__ import annotations

import os
import time


def first_attempt_hangs(marker: str) -> str:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return "retry"
    time.sleep(3600)
    return "first"
