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


class Backoff:
    """Delays between the rounds of a loop that keeps failing (an outage): doubling from
    ``base`` up to ``cap``, jittered, so replicas do not retry in step; ``reset`` after a round
    that worked. The cap is short: the loop must resume soon after the outage ends."""

    def __init__(
        self, base: float = 0.25, cap: float = 2.0, rng: random.Random | None = None
    ) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng

    def next(self) -> float:
        self.failures += 1
        return min(self.cap, retry_delay(self.base, self.failures, self._rng))

    def reset(self) -> None:
        self.failures = 0
