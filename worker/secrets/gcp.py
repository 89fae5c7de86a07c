"""Google Secret Manager (extra ``rexec[gcp]``): secret ``name`` is
``projects/<project>/secrets/<REXEC_SECRETS_NAME_PREFIX><name>/versions/latest``. Credentials
come from Application Default Credentials (workload identity on GKE)."""

from __future__ import annotations

import importlib
import os
from typing import Any

from rexec.schemas.settings import Settings

from .base import BackendFailure, SecretsBackend, SecretsConfigError, missing_extra


class GcpBackend(SecretsBackend):
    name = "gcp"
    hidden_env = ("GOOGLE_APPLICATION_CREDENTIALS",)

    def __init__(self, settings: Settings) -> None:
        try:
            secretmanager: Any = importlib.import_module("google.cloud.secretmanager")
            self._errors: Any = importlib.import_module("google.api_core.exceptions")
        except ImportError:
            raise missing_extra("gcp", "google-cloud-secret-manager", "gcp") from None
        self.project = settings.secrets_gcp_project or os.environ.get("GOOGLE_CLOUD_PROJECT", "")
        if not self.project:
            raise SecretsConfigError(
                "the gcp secrets backend needs the project: set REXEC_SECRETS_GCP_PROJECT "
                "(or GOOGLE_CLOUD_PROJECT)"
            )
        self.prefix = settings.secrets_name_prefix
        self._client = secretmanager.SecretManagerServiceClient()

    def _name(self, name: str) -> str:
        return f"projects/{self.project}/secrets/{self.prefix}{name}/versions/latest"

    def where(self, name: str) -> str:
        return f"Google Secret Manager {self._name(name)}"

    def lookup(self, name: str) -> str | None:
        try:
            response = self._client.access_secret_version(name=self._name(name))
        except self._errors.NotFound:
            return None
        except (self._errors.PermissionDenied, self._errors.Unauthenticated) as exc:
            raise BackendFailure(
                f"Google Secret Manager refused: {type(exc).__name__}", retryable=False
            ) from None
        except self._errors.GoogleAPIError as exc:
            raise BackendFailure(
                f"Google Secret Manager failed: {type(exc).__name__}", retryable=True
            ) from None
        return bytes(response.payload.data).decode("utf-8", errors="replace")
