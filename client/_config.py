"""Where the client finds the API, and how it authenticates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.settings import load_settings

from . import _credentials


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    api_key: str
    timeout: float

    @classmethod
    def make(cls, base_url: str | None, api_key: str | None, timeout: float) -> ClientConfig:
        """An explicit key, else ``REXEC_API_KEY``, else the key ``rexec login`` stored for
        this URL."""
        if base_url is None or api_key is None:
            settings = load_settings()
            base_url = settings.api_url if base_url is None else base_url
            if api_key is None:
                api_key = settings.api_key or _credentials.key_for(settings, base_url)
        return cls(base_url=base_url.rstrip("/"), api_key=api_key, timeout=timeout)

    def httpx_options(self) -> dict[str, Any]:
        headers = {"user-agent": "rexec-client/1", "accept": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return {"base_url": self.base_url, "headers": headers, "timeout": self.timeout}
