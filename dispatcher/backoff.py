"""Retry delays: exponential backoff with jitter, so retries of many tasks do not stampede."""

from __future__ import annotations

import math
import random

MAX_DELAY = 300.0
_RNG = random.Random()


def retry_delay(base: float, failed_attempt: int, rng: random.Random | None = None) -> float:
    """Delay before the attempt after ``failed_attempt`` (1-based): "equal jitter" backoff.

    Half the exponential delay is kept so retries never come back immediately; the other half
    is random so tasks that failed together spread out.

    ``base * 2 ** (failed_attempt - 1)`` is never computed as such: ``2.0 ** 1100`` raises
    OverflowError. The delay is ``MAX_DELAY`` once the doublings reach it (compared in
    logarithms), and below that ``ldexp`` scales ``base`` exactly, whatever the attempt.
    """
    if not base > 0:  # also NaN
        return 0.0
    doublings = max(failed_attempt - 1, 0)
    if math.isinf(base) or doublings >= math.log2(MAX_DELAY) - math.log2(base):
        delay = MAX_DELAY
    else:
        delay = min(MAX_DELAY, math.ldexp(base, doublings))
    return delay / 2 + (rng or _RNG).uniform(0, delay / 2)
