"""AWS Secrets Manager through boto3 (extra ``rexec[aws]``): secret ``name`` is the secret id
``<REXEC_SECRETS_NAME_PREFIX><name>``, its ``SecretString`` the value. Credentials and region
come from boto3's own chain (IRSA, instance profile, ``AWS_*``)."""

from __future__ import annotations

import importlib
from typing import Any

from rexec.schemas.settings import Settings

from .base import BackendFailure, SecretsBackend, missing_extra

_DENIED = {"AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException"}


class AwsBackend(SecretsBackend):
    name = "aws"
    hidden_env = ("AWS_",)

    def __init__(self, settings: Settings) -> None:
        try:
            boto3: Any = importlib.import_module("boto3")
            self._botocore: Any = importlib.import_module("botocore.exceptions")
        except ImportError:
            raise missing_extra("aws", "boto3", "aws") from None
        self.prefix = settings.secrets_name_prefix
        self._client = boto3.client(
            "secretsmanager", region_name=settings.secrets_aws_region or None
        )

    def where(self, name: str) -> str:
        return f"AWS Secrets Manager secret id {self.prefix}{name}"

    def lookup(self, name: str) -> str | None:
        try:
            response = self._client.get_secret_value(SecretId=self.prefix + name)
        except self._botocore.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "ResourceNotFoundException":
                return None
            raise BackendFailure(
                f"AWS Secrets Manager refused: {code}", retryable=code not in _DENIED
            ) from None
        except self._botocore.BotoCoreError as exc:
            raise BackendFailure(
                f"cannot reach AWS Secrets Manager: {type(exc).__name__}", retryable=True
            ) from None
        if "SecretString" in response:
            return str(response["SecretString"])
        return bytes(response["SecretBinary"]).decode("utf-8", errors="replace")
