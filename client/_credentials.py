"""The credentials file of ``rexec login``: API keys by API URL, readable by its owner only.

``$XDG_CONFIG_HOME/rexec/credentials`` (``~/.config/rexec/credentials``), or
``REXEC_CREDENTIALS_FILE``. A key is stored for the URL it was checked against and sent only
to that URL, so pointing the CLI at another server does not hand it the key.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from rexec.schemas.settings import Settings

MODE = 0o600


def path(settings: Settings) -> Path:
    if settings.credentials_file:
        return Path(settings.credentials_file).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "rexec" / "credentials"


def _normal(url: str) -> str:
    return url.rstrip("/")


def _read(file: Path) -> dict[str, str]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, dict):
        return {}
    return {str(url): str(key) for url, key in keys.items() if isinstance(key, str)}


def key_for(settings: Settings, api_url: str) -> str:
    """The stored key for ``api_url``, or ``""``."""
    return _read(path(settings)).get(_normal(api_url), "")


def store(settings: Settings, api_url: str, key: str) -> Path:
    """Store ``key`` for ``api_url`` (mode 0600, its folder 0700); return the file's path."""
    file = path(settings)
    file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = _read(file)
    keys[_normal(api_url)] = key
    text = json.dumps({"keys": keys}, indent=2) + "\n"
    partial = file.with_name(file.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, MODE)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(partial, MODE)  # whatever the umask
    os.replace(partial, file)
    return file
