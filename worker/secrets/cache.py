"""A short-lived cache of resolved values: tasks that name the same secret in a burst cost one
backend call, and a rotated secret is picked up within the TTL."""

from __future__ import annotations

import time
from collections.abc import Callable


class SecretCache:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[str, tuple[float, str]] = {}

    def get(self, name: str) -> str | None:
        entry = self._entries.get(name)
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            del self._entries[name]
            return None
        return value

    def put(self, name: str, value: str) -> None:
        if self.ttl > 0:
            self._entries[name] = (self._clock() + self.ttl, value)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
