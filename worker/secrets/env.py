"""Secrets from the agent's own environment: secret ``name`` is ``REXEC_SECRET_<name>``.

The variables are the agent's only: the task environment never carries the prefix, so a
task sees only the secrets it named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .base import SecretsBackend, SecretsConfigError


class EnvBackend(SecretsBackend):
    name = "env"

    def __init__(self, prefix: str, environ: Mapping[str, str] | None = None) -> None:
        if not prefix:
            raise SecretsConfigError(
                "REXEC_SECRETS_ENV_PREFIX must not be empty: with no prefix every variable of "
                "the agent would be a secret; use the default REXEC_SECRET_"
            )
        self.prefix = prefix
        self.hidden_env = (prefix,)
        self._environ = os.environ if environ is None else environ

    def lookup(self, name: str) -> str | None:
        return self._environ.get(self.prefix + name)

    def where(self, name: str) -> str:
        return f"environment variable {self.prefix}{name} of the agent"
