"""Task functions that use a secret, and that try every way to leak it back."""

from __future__ import annotations

import base64
import hashlib
import logging
import sys
from typing import Any

from rexec.worker.context import secret


def digest(name: str) -> str:
    """Proves the task got the value, without sending it back."""
    return hashlib.sha256(secret(name).encode()).hexdigest()


def return_it(name: str) -> str:
    return secret(name)


def return_nested(name: str) -> dict[str, Any]:
    return {"nested": [secret(name), {"again": f"x{secret(name)}x"}]}


def return_base64(name: str) -> str:
    return base64.b64encode(secret(name).encode()).decode()


def raise_it(name: str) -> None:
    value = secret(name)
    raise RuntimeError(f"cannot connect with password {value!r} ({value})")


def print_it(name: str) -> str:
    print(f"stdout: {secret(name)}", flush=True)
    print(f"stderr: {secret(name)}", file=sys.stderr, flush=True)
    return "printed"


def log_it(name: str) -> str:
    logging.getLogger("customer.task").error("the secret is %s", secret(name))
    return "logged"


def ask_unnamed() -> str:
    return secret("not_named")
