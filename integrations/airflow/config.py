"""The executor's settings: the ``[rexec]`` section of Airflow's configuration.

As any Airflow option, each may come from ``airflow.cfg`` or from ``AIRFLOW__REXEC__<OPTION>``.
The API key is the exception: never an option in clear, it comes from ``api_key_file`` or the
environment's ``REXEC_API_KEY`` (a Kubernetes secret mounted as a file or an env var).

::

    [rexec]
    api_url = https://rexec.example.com
    api_key_file = /run/secrets/rexec-api-key
    # Airflow queue = rexec pool; queues not listed go to default_pool (or a pool of their name)
    pools = default=airflow, gpu=gpu-agents
    default_pool = airflow
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SECTION = "rexec"
RUNNER = "rexec.airflow.runner:run_workload"
"""The function an agent runs for each try; an agent allows it with ``--allow 'rexec.airflow.*'``."""


class ConfigError(ValueError):
    """The ``[rexec]`` section is missing something or holds a value that cannot work."""


class AirflowConf(Protocol):
    """The part of Airflow's ``conf`` (``AirflowConfigParser``) read here."""

    def get(self, section: str, key: str, fallback: str = ...) -> str | None: ...


@dataclass(frozen=True)
class ExecutorConfig:
    api_url: str
    api_key: str | None
    ca_file: str | None
    pools: Mapping[str, str]
    """Airflow queue -> rexec pool."""
    default_pool: str | None
    """The pool of a queue not in ``pools``; None: a pool named as the queue."""
    max_attempts: int
    """Attempts of one try on rexec: another agent takes the try over when one is lost before
    the try started. After it started, Airflow's own retries apply (the Execution API refuses
    a second start of the same try)."""
    feed_wait: float
    """Seconds one long-poll of the change feed waits for news."""
    reconcile_interval: float
    """Seconds between two reads of every tracked task (backs the feed up)."""

    def pool_for(self, queue: str | None) -> str:
        name = queue or "default"
        return self.pools.get(name) or self.default_pool or name

    @property
    def all_pools(self) -> list[str]:
        """The pools the feed follows; empty when queues map to pools by name (follow all)."""
        if self.default_pool is None:
            return []
        return sorted({*self.pools.values(), self.default_pool})


def parse_pools(text: str) -> dict[str, str]:
    """``queue=pool, queue2=pool2`` -> mapping; a clear error for anything else."""
    pools: dict[str, str] = {}
    for item in text.replace("\n", ",").split(","):
        if not item.strip():
            continue
        queue, sep, pool = (part.strip() for part in item.partition("="))
        if not sep or not queue or not pool:
            raise ConfigError(
                f"[{SECTION}] pools: {item.strip()!r} is not 'queue=pool' "
                "(example: pools = default=airflow, gpu=gpu-agents)"
            )
        pools[queue] = pool
    return pools


def _number(conf: AirflowConf, key: str, default: float, low: float, high: float) -> float:
    raw = conf.get(SECTION, key, fallback="") or ""
    if not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"[{SECTION}] {key} = {raw!r} is not a number") from None
    if not low <= value <= high:
        raise ConfigError(f"[{SECTION}] {key} = {raw} is outside {low:g}..{high:g}")
    return value


def read_api_key(conf: AirflowConf, environ: Mapping[str, str] = os.environ) -> str | None:
    path = (conf.get(SECTION, "api_key_file", fallback="") or "").strip()
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            raise ConfigError(
                f"[{SECTION}] api_key_file = {path}: cannot read it ({exc.strerror})"
            ) from None
    return environ.get("REXEC_API_KEY") or None


def from_airflow(conf: AirflowConf, environ: Mapping[str, str] = os.environ) -> ExecutorConfig:
    api_url = (
        conf.get(SECTION, "api_url", fallback="") or environ.get("REXEC_API_URL", "")
    ).strip()
    if not api_url:
        raise ConfigError(
            f"[{SECTION}] api_url is not set: point it (or AIRFLOW__REXEC__API_URL) at the rexec "
            "API, e.g. https://rexec.example.com"
        )
    if (conf.get(SECTION, "api_key", fallback="") or "").strip():
        raise ConfigError(
            f"[{SECTION}] api_key is not read (a key in clear in airflow.cfg leaks): put the key "
            "in a file named by api_key_file, or in the environment as REXEC_API_KEY"
        )
    default_pool = (conf.get(SECTION, "default_pool", fallback="") or "").strip() or None
    return ExecutorConfig(
        api_url=api_url.rstrip("/"),
        api_key=read_api_key(conf, environ),
        ca_file=(conf.get(SECTION, "ca_file", fallback="") or "").strip() or None,
        pools=parse_pools(conf.get(SECTION, "pools", fallback="") or ""),
        default_pool=default_pool,
        max_attempts=int(_number(conf, "max_attempts", 3, 1, 100)),
        feed_wait=_number(conf, "feed_wait", 10.0, 0.5, 55.0),
        reconcile_interval=_number(conf, "reconcile_interval", 30.0, 1.0, 3600.0),
    )
