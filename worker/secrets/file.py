"""Secrets from a mounted directory (one file per secret, as a Kubernetes Secret volume lays
them out) or from one JSON file holding an object of name to value.

Read at each lookup (the cache limits how often), so a rotated Secret is picked up. One
trailing line ending is dropped from a file's content: ``echo pw > file`` means ``pw``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import BackendFailure, SecretsBackend, SecretsConfigError


class FileBackend(SecretsBackend):
    name = "file"

    def __init__(self, path: str) -> None:
        if not path:
            raise SecretsConfigError("REXEC_SECRETS_PATH is empty: give the secrets directory")
        self.path = Path(path)

    def lookup(self, name: str) -> str | None:
        if self.path.is_dir():
            return self._from_directory(name)
        if self.path.is_file():
            return self._from_json(name)
        raise BackendFailure(
            f"{self.path} does not exist: mount the secrets there or set REXEC_SECRETS_PATH",
            retryable=False,
        )

    def _from_directory(self, name: str) -> str | None:
        # Names are identifiers (checked at submit and by the agent): no '/' nor '..'.
        file = self.path / name
        if not file.is_file():
            return None
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BackendFailure(f"cannot read {file}: {exc}", retryable=False) from None
        return _strip_line_end(text)

    def _from_json(self, name: str) -> str | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            # The error of a JSON parse may quote the file: name only its position.
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            raise BackendFailure(
                f"cannot read {self.path} as a JSON object of name to value: {detail}",
                retryable=False,
            ) from None
        if not isinstance(data, dict):
            raise BackendFailure(
                f"{self.path} must hold a JSON object of name to value", retryable=False
            )
        value = data.get(name)
        if value is None:
            return None
        return value if isinstance(value, str) else json.dumps(value)

    def where(self, name: str) -> str:
        if self.path.is_file():
            return f"key {name!r} of {self.path}"
        return f"file {self.path / name}"


def _strip_line_end(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text
