"""Retry delays: exponential backoff with jitter, so retries of many tasks do not stampede."""

from __future__ import annotations

import random

MAX_DELAY = 300.0
_RNG = random.Random()


def retry_delay(base: float, failed_attempt: int, rng: random.Random | None = None) -> float:
    """Delay before the attempt after ``failed_attempt`` (1-based): "equal jitter" backoff.

    Half the exponential delay is kept so retries never come back immediately; the other half
    is random so tasks that failed together spread out.
    """
    if base <= 0:
        return 0.0
    delay = min(MAX_DELAY, base * 2.0 ** (failed_attempt - 1))
    return delay / 2 + (rng or _RNG).uniform(0, delay / 2)
