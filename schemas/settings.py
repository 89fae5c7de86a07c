"""The one place rexec reads its configuration: ``REXEC_*`` environment variables.

Both planes read the same variables; each uses the ones that concern it. Tracing is configured
by the standard ``OTEL_*`` variables, read by the OpenTelemetry SDK itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec

from .amqp import parse_amqp_urls


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str = "sqlite+aiosqlite:///rexec.db"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    """RabbitMQ: one URL, or the nodes of one cluster separated by commas (``schemas.amqp``)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "rexec"
    api_url: str = "http://127.0.0.1:8600"
    api_host: str = "127.0.0.1"
    api_port: int = 8600
    heartbeat_ttl: float = 6.0
    """Seconds an agent's heartbeat key lives; agents refresh it several times per TTL."""
    watchdog_interval: float = 1.0
    management_url: str = "http://guest:guest@127.0.0.1:15672"
    """RabbitMQ's management API: the watchdog closes a dead agent's connection through it
    so its unacked deliveries return at once. Empty disables it."""
    max_payload_bytes: int = 256 * 1024
    max_result_bytes: int = 256 * 1024
    delivery_limit: int = 5
    """Deliveries of one message before the broker dead-letters it as poison."""
    default_max_attempts: int = 3
    default_retry_backoff: float = 1.0
    agent_token: str = ""
    health_port: int = 0
    """Port of the agent's health server (``/healthz``, ``/readyz``, ``/metrics``); 0 turns it
    off, so several agents on one machine do not collide. The Helm chart sets 8081."""
    api_key: str = ""

    def __post_init__(self) -> None:
        parse_amqp_urls(self.amqp_url)  # a bad REXEC_AMQP_URL fails at startup, by name


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from ``REXEC_<FIELD>`` variables, then explicit overrides."""
    env = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for field in msgspec.structs.fields(Settings):
        value = env.get(f"REXEC_{field.name.upper()}")
        # An empty string is a value for text settings (REXEC_MANAGEMENT_URL= disables the
        # management API); for numbers it means "unset".
        if value is not None and (value != "" or field.type is str):
            raw[field.name] = value
    raw.update(overrides)
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid rexec setting: {exc} (check the REXEC_* variables)") from None
