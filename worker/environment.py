"""The environment tasks run in: the agent's own, minus the agent's credentials.

A task is customer code, but it must not be able to act as the agent: with the agent's token
or broker and Redis URLs it could forge heartbeats or events, which least privilege forbids.
Neither may it read the secrets backend's credentials or settings (``hidden_prefixes``), nor
secrets it did not name: a command task gets exactly the secrets it named, added by the caller.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

AGENT_SECRETS = frozenset(
    {
        "REXEC_AGENT_TOKEN",
        "REXEC_AMQP_URL",
        "REXEC_REDIS_URL",
        "REXEC_DATABASE_URL",
        "REXEC_API_KEY",
    }
)
ALWAYS_HIDDEN_PREFIXES = ("REXEC_SECRETS_", "REXEC_SECRET_")


def task_environment(
    base: Mapping[str, str] | None = None, *, hidden_prefixes: Iterable[str] = ()
) -> dict[str, str]:
    source = os.environ if base is None else base
    prefixes = (*ALWAYS_HIDDEN_PREFIXES, *(p for p in hidden_prefixes if p))
    return {
        k: v for k, v in source.items() if k not in AGENT_SECRETS and not k.startswith(prefixes)
    }
