"""Resolves the secrets a task names, through the cache, and registers each value with the
masker before anything can echo it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
import anyio.to_thread

from rexec.schemas.names import SECRET_NAME

from .base import BackendFailure, SecretError, SecretNotFound, SecretsBackend
from .cache import SecretCache
from .masking import Masker

log = logging.getLogger("rexec.agent.secrets")


class Resolver:
    def __init__(self, backend: SecretsBackend, cache: SecretCache, masker: Masker) -> None:
        self.backend = backend
        self.cache = cache
        self.masker = masker
        self.lookups = 0
        """Backend calls made (cache misses), for tests and metrics."""
        self._locks: dict[str, anyio.Lock] = {}

    async def resolve(self, names: Sequence[str]) -> dict[str, str]:
        """Every named value, or ``SecretError`` naming the first that cannot be had."""
        values: dict[str, str] = {}
        for name in names:
            value = self.cache.get(name)
            if value is None:
                value = await self._fetch(name)
            self.masker.add(value)
            values[name] = value
        return values

    async def _fetch(self, name: str) -> str:
        """One backend call per name at a time: attempts that start together share it."""
        lock = self._locks.setdefault(name, anyio.Lock())
        async with lock:
            value = self.cache.get(name)  # filled while we waited?
            if value is None:
                value = await self._lookup(name)
                self.cache.put(name, value)
        if not lock.locked() and not lock.statistics().tasks_waiting:
            self._locks.pop(name, None)
        return value

    async def _lookup(self, name: str) -> str:
        backend = self.backend.name
        if not SECRET_NAME.match(name):  # the dispatcher checks; a forged message may not
            raise SecretError(f"invalid secret name {name!r}", retryable=False)
        self.lookups += 1
        try:
            value = await anyio.to_thread.run_sync(
                self.backend.lookup, name, abandon_on_cancel=True
            )
        except BackendFailure as exc:
            raise SecretError(
                f"cannot resolve secret {name!r} from the {backend} secrets backend: {exc}",
                retryable=exc.retryable,
            ) from None
        except Exception as exc:  # an SDK's surprise must still fail the attempt clearly
            log.warning(
                "secrets backend error",
                extra={"secret": name, "backend": backend, "error_type": type(exc).__name__},
            )
            raise SecretError(
                f"cannot resolve secret {name!r} from the {backend} secrets backend: "
                f"{type(exc).__name__}",
                retryable=True,
            ) from None
        if value is None:
            raise SecretNotFound(name, backend, self.backend.where(name))
        return value
