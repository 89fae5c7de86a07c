"""Submission rate limit per API key: a token bucket in each dispatcher replica.

A key may submit ``submit_burst`` tasks at once, then ``submit_rate`` tasks per second. The
buckets live in the replica's memory (no shared store): with N replicas behind a load balancer
a key gets up to N times the rate. Written by hand because it is a dozen lines and needs the
exact wait for ``Retry-After``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from .service import ServiceError

MAX_KEYS = 100_000
"""Buckets kept before full ones are forgotten (a full bucket carries no state)."""


class RateLimited(ServiceError):
    """Too many submissions for one API key (429, with ``Retry-After``)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, {"retry_after": retry_after})
        self.retry_after = retry_after


@dataclass
class _Bucket:
    tokens: float
    at: float


class SubmitLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key_id: str, tasks: int = 1) -> None:
        """Take ``tasks`` from the key's bucket, or raise :class:`RateLimited` taking nothing."""
        if not self.enabled or tasks <= 0:
            return
        if tasks > self.burst:
            raise RateLimited(
                f"a batch of {tasks} tasks is more than one API key may submit at once "
                f"({self.burst}, REXEC_SUBMIT_BURST): send batches of at most {self.burst}",
                retry_after=math.ceil(self.burst / self.rate),
            )
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                if len(self._buckets) >= MAX_KEYS:
                    self._forget_full(now)
                bucket = self._buckets[key_id] = _Bucket(tokens=float(self.burst), at=now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
            if bucket.tokens >= tasks:
                bucket.tokens -= tasks
                return
            wait = (tasks - bucket.tokens) / self.rate
        raise RateLimited(
            f"rate limit: this API key may submit {self.rate:g} tasks per second "
            f"(bursts of {self.burst}; REXEC_SUBMIT_RATE, REXEC_SUBMIT_BURST); "
            f"retry in {wait:.1f}s",
            retry_after=max(1, math.ceil(wait)),
        )

    def _forget_full(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.at) * self.rate >= self.burst:
                del self._buckets[key]
