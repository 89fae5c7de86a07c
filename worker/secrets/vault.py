"""HashiCorp Vault (or OpenBao) KV version 2 through ``hvac`` (extra ``rexec[vault]``).

Secret ``name`` is read at ``<mount>/data/<path>/<name>``; its value is the key
``REXEC_SECRETS_VAULT_FIELD`` (``value``), or, for a secret without that key, all its keys as
a JSON object (a connection's fields, say). The agent authenticates with a token
(``REXEC_SECRETS_VAULT_TOKEN`` or ``VAULT_TOKEN``) or with Kubernetes auth (a role and the
pod's service account token), logging in again when Vault refuses an expired login.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from rexec.schemas.settings import Settings

from .base import BackendFailure, SecretsBackend, SecretsConfigError, missing_extra


class VaultBackend(SecretsBackend):
    name = "vault"
    hidden_env = ("VAULT_",)

    def __init__(self, settings: Settings) -> None:
        try:
            self._hvac: Any = importlib.import_module("hvac")
            self._requests: Any = importlib.import_module("requests")
        except ImportError:
            raise missing_extra("vault", "hvac", "vault") from None
        self.url = settings.secrets_vault_url or os.environ.get("VAULT_ADDR", "")
        if not self.url:
            raise SecretsConfigError(
                "the vault secrets backend needs the server's address: set "
                "REXEC_SECRETS_VAULT_URL (or VAULT_ADDR)"
            )
        self.token = settings.secrets_vault_token or os.environ.get("VAULT_TOKEN", "")
        self.role = settings.secrets_vault_role or os.environ.get("VAULT_AUTH_ROLE", "")
        if not self.token and not self.role:
            raise SecretsConfigError(
                "the vault secrets backend has no credentials: set VAULT_TOKEN (or "
                "REXEC_SECRETS_VAULT_TOKEN), or REXEC_SECRETS_VAULT_ROLE for Kubernetes auth"
            )
        self.auth_mount = settings.secrets_vault_auth_mount
        self.jwt_path = Path(settings.secrets_vault_jwt_path)
        self.mount = settings.secrets_vault_mount
        self.prefix = settings.secrets_vault_path.strip("/")
        self.field = settings.secrets_vault_field
        self._client: Any = None

    def _path(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name: str) -> str:
        return f"KV v2 mount {self.mount!r}, path {self._path(name)!r} at {self.url}"

    def _login(self) -> Any:
        client = self._hvac.Client(url=self.url, token=self.token or None)
        if not self.token:
            try:
                jwt = self.jwt_path.read_text().strip()
            except OSError as exc:
                raise BackendFailure(
                    f"cannot read the service account token {self.jwt_path} for Kubernetes "
                    f"auth: {exc.strerror or exc}",
                    retryable=False,
                ) from None
            client.auth.kubernetes.login(self.role, jwt, mount_point=self.auth_mount)
        self._client = client
        return client

    def lookup(self, name: str) -> str | None:
        exceptions = self._hvac.exceptions
        try:
            try:
                data = self._read(self._client or self._login(), name)
            except exceptions.Forbidden:
                if self.token:
                    raise
                data = self._read(self._login(), name)  # the login may have expired
        except exceptions.InvalidPath:
            return None
        except exceptions.Forbidden:
            raise BackendFailure(
                "permission denied: the agent's Vault policy must allow reading "
                f"{self.mount}/data/{self._path(name)}",
                retryable=False,
            ) from None
        except exceptions.VaultError as exc:
            raise BackendFailure(f"Vault refused: {type(exc).__name__}", retryable=True) from None
        except self._requests.exceptions.RequestException as exc:
            raise BackendFailure(
                f"cannot reach Vault at {self.url}: {type(exc).__name__}", retryable=True
            ) from None
        if not data:
            return None
        if self.field in data:
            value = data[self.field]
            return value if isinstance(value, str) else json.dumps(value)
        return json.dumps(data)

    def _read(self, client: Any, name: str) -> dict[str, Any]:
        response = client.secrets.kv.v2.read_secret_version(
            path=self._path(name), mount_point=self.mount, raise_on_deleted_version=True
        )
        data = response.get("data", {}).get("data")
        return data if isinstance(data, dict) else {}
