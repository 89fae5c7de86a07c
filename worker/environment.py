"""The environment tasks run in: the agent's own, minus the agent's credentials.

A task is customer code, but it must not be able to act as the agent: with the agent's token
or broker and Redis URLs it could forge heartbeats or events, which least privilege forbids.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

AGENT_SECRETS = frozenset(
    {
        "REXEC_AGENT_TOKEN",
        "REXEC_AMQP_URL",
        "REXEC_REDIS_URL",
        "REXEC_DATABASE_URL",
        "REXEC_API_KEY",
    }
)


def task_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    source = os.environ if base is None else base
    return {k: v for k, v in source.items() if k not in AGENT_SECRETS}
