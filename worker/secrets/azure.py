"""Azure Key Vault (extra ``rexec[azure]``): secret ``name`` is the Key Vault secret
``<REXEC_SECRETS_NAME_PREFIX><name>`` with every ``_`` turned into ``-`` (Key Vault names
allow only letters, digits and dashes). Credentials come from ``DefaultAzureCredential``
(workload identity on AKS)."""

from __future__ import annotations

import importlib
import os
from typing import Any

from rexec.schemas.settings import Settings

from .base import BackendFailure, SecretsBackend, SecretsConfigError, missing_extra


class AzureBackend(SecretsBackend):
    name = "azure"
    hidden_env = ("AZURE_",)

    def __init__(self, settings: Settings) -> None:
        try:
            identity: Any = importlib.import_module("azure.identity")
            secrets: Any = importlib.import_module("azure.keyvault.secrets")
            self._errors: Any = importlib.import_module("azure.core.exceptions")
        except ImportError:
            raise missing_extra("azure", "azure-keyvault-secrets", "azure") from None
        self.url = settings.secrets_azure_vault_url or os.environ.get("AZURE_KEYVAULT_URL", "")
        if not self.url:
            raise SecretsConfigError(
                "the azure secrets backend needs the vault's URL: set "
                "REXEC_SECRETS_AZURE_VAULT_URL (or AZURE_KEYVAULT_URL)"
            )
        self.prefix = settings.secrets_name_prefix
        self._client = secrets.SecretClient(
            vault_url=self.url, credential=identity.DefaultAzureCredential()
        )

    def _name(self, name: str) -> str:
        return (self.prefix + name).replace("_", "-")

    def where(self, name: str) -> str:
        return f"Azure Key Vault secret {self._name(name)!r} in {self.url}"

    def lookup(self, name: str) -> str | None:
        try:
            secret = self._client.get_secret(self._name(name))
        except self._errors.ResourceNotFoundError:
            return None
        except self._errors.ClientAuthenticationError as exc:
            raise BackendFailure(
                f"Azure Key Vault refused: {type(exc).__name__}", retryable=False
            ) from None
        except self._errors.AzureError as exc:
            status = getattr(exc, "status_code", None)
            raise BackendFailure(
                f"Azure Key Vault failed: {type(exc).__name__}", retryable=status != 403
            ) from None
        return None if secret.value is None else str(secret.value)
