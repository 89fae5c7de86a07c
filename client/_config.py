"""Where the client finds the API, how it authenticates, and which CA it trusts."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from rexec.schemas import tls
from rexec.schemas.settings import load_settings

from . import _credentials
from ._calls import RexecError


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    api_key: str
    timeout: float
    verify: ssl.SSLContext | bool = True
    """The API's HTTPS certificate is checked against this (``REXEC_CA_FILE``, else httpx's
    default: ``SSL_CERT_FILE`` or certifi)."""

    @classmethod
    def make(
        cls, base_url: str | None, api_key: str | None, timeout: float, ca_file: str | None = None
    ) -> ClientConfig:
        """An explicit key, else ``REXEC_API_KEY``, else the key ``rexec login`` stored for
        this URL."""
        if base_url is None or api_key is None or ca_file is None:
            settings = load_settings()
            base_url = settings.api_url if base_url is None else base_url
            if api_key is None:
                api_key = settings.api_key or _credentials.key_for(settings, base_url)
            ca_file = settings.ca_file if ca_file is None else ca_file
        try:
            verify = tls.http_verify(ca_file)
        except tls.TLSConfigError as exc:
            raise RexecError(None, str(exc)) from None
        return cls(base_url=base_url.rstrip("/"), api_key=api_key, timeout=timeout, verify=verify)

    def httpx_options(self) -> dict[str, Any]:
        headers = {"user-agent": "rexec-client/1", "accept": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return {
            "base_url": self.base_url,
            "headers": headers,
            "timeout": self.timeout,
            "verify": self.verify,
        }
