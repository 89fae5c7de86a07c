"""Agent-side secrets: tasks name them, the agent resolves them from its own backend.

Only names cross between the planes. ``build_backend`` picks the backend from the settings
(``REXEC_SECRETS_BACKEND``); the SDK of an optional backend is imported only when chosen.
"""

from __future__ import annotations

from rexec.schemas.settings import Settings

from .base import SecretError, SecretNotFound, SecretsBackend, SecretsConfigError
from .cache import SecretCache
from .env import EnvBackend
from .file import FileBackend
from .masking import Masker, MaskingFormatter, mask_logs
from .resolver import Resolver

BACKENDS = ("env", "file", "vault", "aws", "gcp", "azure")

HIDDEN_ENV = ("REXEC_SECRETS_", "REXEC_SECRET_")
"""The agent's secrets settings and the env backend's default prefix: never in a task's
environment, whichever backend is chosen."""

__all__ = [
    "BACKENDS",
    "HIDDEN_ENV",
    "Masker",
    "MaskingFormatter",
    "Resolver",
    "SecretCache",
    "SecretError",
    "SecretNotFound",
    "SecretsBackend",
    "SecretsConfigError",
    "build_backend",
    "build_resolver",
    "hidden_env",
    "mask_logs",
]


def build_backend(settings: Settings) -> SecretsBackend:
    choice = settings.secrets_backend.strip().lower()
    if choice == "env":
        return EnvBackend(settings.secrets_env_prefix)
    if choice == "file":
        return FileBackend(settings.secrets_path)
    if choice == "vault":
        from .vault import VaultBackend

        return VaultBackend(settings)
    if choice == "aws":
        from .aws import AwsBackend

        return AwsBackend(settings)
    if choice == "gcp":
        from .gcp import GcpBackend

        return GcpBackend(settings)
    if choice == "azure":
        from .azure import AzureBackend

        return AzureBackend(settings)
    raise SecretsConfigError(
        f"unknown secrets backend {settings.secrets_backend!r} (REXEC_SECRETS_BACKEND): "
        f"choose one of {', '.join(BACKENDS)}"
    )


def build_resolver(
    settings: Settings, masker: Masker, backend: SecretsBackend | None = None
) -> Resolver:
    return Resolver(
        backend or build_backend(settings), SecretCache(settings.secrets_cache_ttl), masker
    )


def hidden_env(settings: Settings, backend: SecretsBackend) -> tuple[str, ...]:
    """Prefixes of variables a task's environment must not carry."""
    prefixes = {*HIDDEN_ENV, *backend.hidden_env}
    if settings.secrets_env_prefix:
        prefixes.add(settings.secrets_env_prefix)
    return tuple(sorted(prefixes))
