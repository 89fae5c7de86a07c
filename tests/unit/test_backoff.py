from __future__ import annotations

import random

from rexec.dispatcher.backoff import MAX_DELAY, retry_delay


def test_delay_doubles_per_attempt_with_jitter_in_the_upper_half() -> None:
    rng = random.Random(7)
    for attempt in range(1, 8):
        full = min(MAX_DELAY, 2.0 * 2 ** (attempt - 1))
        for _ in range(50):
            assert full / 2 <= retry_delay(2.0, attempt, rng) <= full


def test_delay_is_capped_and_zero_base_means_no_wait() -> None:
    assert retry_delay(10.0, 40) <= MAX_DELAY
    assert retry_delay(0.0, 3) == 0.0
