from __future__ import annotations

import math
import random

import pytest

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


@pytest.mark.parametrize("attempt", [1100, 10_000, 2**63])
@pytest.mark.parametrize("base", [5e-324, 1e-300, 0.001, 1.0, 86_400.0, 1e308, math.inf])
def test_no_attempt_number_overflows_the_delay(base: float, attempt: int) -> None:
    """``2.0 ** 1099`` overflows: a task with max_attempts 1100 once killed the events consumer."""
    delay = retry_delay(base, attempt)
    assert MAX_DELAY / 2 <= delay <= MAX_DELAY


def test_a_tiny_base_grows_like_any_other() -> None:
    """The doublings are exact even from a subnormal base: ldexp, not a product that rounds."""
    rng = random.Random(3)
    for attempt in (1, 2, 10, 1000, 1070):
        full = min(MAX_DELAY, math.ldexp(5e-324, attempt - 1))
        assert full / 2 <= retry_delay(5e-324, attempt, rng) <= full
    assert retry_delay(5e-324, 1084, rng) >= MAX_DELAY / 2  # 5e-324 is 2**-1074: 512 s, capped


def test_a_base_that_is_no_number_means_no_wait() -> None:
    assert retry_delay(math.nan, 5) == 0.0
    assert retry_delay(-1.0, 5) == 0.0
    assert retry_delay(1.0, 0) <= 1.0 and retry_delay(1.0, -5) <= 1.0
