"""The interface every secrets backend implements, and the errors resolution can end in.

A backend is synchronous (the SDKs are) and is called in a worker thread. It answers one name
at a time with the value, or None when the backend has no such secret. Error texts name the
secret and the backend, never a value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class SecretsConfigError(Exception):
    """The agent's secrets backend is misconfigured or its extra is not installed."""


class SecretError(Exception):
    """A secret a task named could not be resolved: the attempt fails before it runs."""

    error_type = "SecretUnavailable"

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class SecretNotFound(SecretError):
    error_type = "SecretNotFound"

    def __init__(self, name: str, backend: str, where: str) -> None:
        super().__init__(
            f"secret {name!r} not found in the {backend} secrets backend ({where}); "
            "create it there, or fix the name the task asks for",
            retryable=False,
        )


class BackendFailure(Exception):
    """Raised by a backend's ``lookup``: the backend failed (not: the secret is missing)."""

    def __init__(self, detail: str, *, retryable: bool) -> None:
        super().__init__(detail)
        self.retryable = retryable


class SecretsBackend(ABC):
    name: str = ""
    hidden_env: tuple[str, ...] = ()
    """Prefixes of the agent's environment variables that are this backend's own credentials
    or settings: they never reach a task's environment."""

    @abstractmethod
    def lookup(self, name: str) -> str | None:
        """The value of secret ``name``, or None if the backend has no such secret."""

    @abstractmethod
    def where(self, name: str) -> str:
        """Where ``lookup`` looks for ``name``, for error messages (no value, no credential)."""


def missing_extra(backend: str, package: str, extra: str) -> SecretsConfigError:
    return SecretsConfigError(
        f"the {backend} secrets backend (REXEC_SECRETS_BACKEND={backend}) needs the {package} "
        f"package: install it with pip install 'rexec[{extra}]' (or add it to the agent image)"
    )
