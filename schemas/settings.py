"""The one place rexec reads its configuration: ``REXEC_*`` environment variables.

Both planes read the same variables; each uses the ones that concern it. Tracing is configured
by the standard ``OTEL_*`` variables, read by the OpenTelemetry SDK itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec

from .amqp import parse_amqp_urls
from .redis_url import check_redis_url


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str = "sqlite+aiosqlite:///rexec.db"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    """RabbitMQ: one URL, or the nodes of one cluster separated by commas (``rexec.schemas.amqp``)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "rexec"
    api_url: str = "http://127.0.0.1:8600"
    api_host: str = "127.0.0.1"
    api_port: int = 8600
    api_read_timeout: float = 30.0
    """Seconds ``rexec serve`` waits for a request's headers and body to arrive in full (from
    the connection's opening, or the request's first byte) before it closes the connection:
    slow clients cannot hold connections forever."""
    api_max_connections: int = 1000
    """Open connections (or running requests) at which ``rexec serve`` answers new requests
    503 instead of serving them; keep it under the process's open-file limit."""
    api_tls_cert: str = ""
    """PEM certificate (chain) ``rexec serve`` presents; with ``api_tls_key`` the API is HTTPS."""
    api_tls_key: str = ""
    ca_file: str = ""
    """PEM CA bundle the CLI, the clients and the agents verify the API's HTTPS certificate
    against; empty: ``SSL_CERT_FILE``, else certifi's bundle (httpx's default)."""
    heartbeat_ttl: float = 6.0
    """Seconds an agent's heartbeat key lives; agents refresh it several times per TTL."""
    watchdog_interval: float = 1.0
    management_url: str = "http://guest:guest@127.0.0.1:15672"
    """RabbitMQ's management API: the watchdog closes a dead agent's connection through it
    so its unacked deliveries return at once. Empty disables it."""
    kill_grace: float = 5.0
    """Seconds a stopped attempt's processes (timeout, cancel, lease lost, drain, or the
    agent's own death) have between SIGTERM and SIGKILL."""
    max_payload_bytes: int = 256 * 1024
    max_result_bytes: int = 256 * 1024
    tasks_per_message: int = 16
    """At most this many attempts for one pool in one task message (protocol 1.2), and never
    more than the smallest concurrency among the pool's agents; 1 sends one per message."""
    outbox_lease: float = 5.0
    """Seconds a new task's outbox row waits before the relay publishes it: the dispatcher
    publishes the task the moment its submit commits, and the relay is the backstop should
    that publish not happen (a crash, a broker error). 0 leaves every publish to the relay."""
    delivery_limit: int = 5
    """Deliveries of one message before the broker dead-letters it as poison."""
    default_max_attempts: int = 3
    default_retry_backoff: float = 1.0
    agent_token: str = ""
    health_port: int = 0
    """Port of the agent's health server (``/healthz``, ``/readyz``, ``/metrics``); 0 turns it
    off, so several agents on one machine do not collide. The Helm chart sets 8081."""
    api_key: str = ""
    """``rexec serve``: the bootstrap admin key (create the others with ``rexec apikey create``).
    The CLI and client: the key they send (before the credentials file of ``rexec login``)."""
    credentials_file: str = ""
    """Where ``rexec login`` stores keys; empty: ``$XDG_CONFIG_HOME/rexec/credentials``."""
    submit_rate: float = 0.0
    """Tasks per second one API key may submit (token bucket, per dispatcher replica); 0: no limit."""
    submit_burst: int = 10_000
    """Tasks one API key may submit at once before ``submit_rate`` applies."""
    agent_credentials: str = "scoped"
    """``scoped``: each agent gets a RabbitMQ user and a Redis ACL user of its own at
    registration, limited to its pool by the servers themselves (needs the management API and
    a Redis user allowed to run ACL). ``shared``: agents use the credentials in their own
    URLs, and the servers cannot tell agents apart."""
    signing_key: str = ""
    """The orchestration plane's Ed25519 private key (URL-safe base64) signing every task
    message. Empty: one is generated once and kept in the metadata database."""
    signing_extra_public_keys: str = ""
    """Comma-separated public keys agents accept besides the current one, for key rotation."""
    signing_public_keys: str = ""
    """On an agent: the public keys it accepts. Empty: the ones announced at registration;
    set, they are pinned and registration cannot change them."""
    # -- task logs (the agent keeps them; the dispatcher keeps only a tail and the location) --
    log_dir: str = "rexec-logs"
    """Where the agent writes each attempt's log: ``<log_dir>/<pool>/<task_id>/<attempt>.log``."""
    log_s3_url: str = ""
    """``s3://bucket/prefix``: keep attempt logs in object storage instead (``pip install
    'rexec[s3]'``; credentials and endpoint from the standard ``AWS_*`` variables)."""
    log_max_bytes: int = 10 * 1024 * 1024
    """Bytes of one attempt's log; output past it is dropped and counted in a last line."""
    log_retention: float = 7 * 86400.0
    """Seconds the agent keeps attempt logs in ``log_dir`` (object storage: use a lifecycle rule)."""
    agent_log_url: str = ""
    """URL where the CLI reaches this agent's logs (its health port); default
    ``http://<hostname>:<health_port>``."""

    def __post_init__(self) -> None:
        parse_amqp_urls(self.amqp_url)  # a bad REXEC_AMQP_URL fails at startup, by name

    # Agent-side secrets: where an agent resolves the secrets a task names (worker/secrets/).
    secrets_backend: str = "env"
    """``env``, ``file``, ``vault``, ``aws``, ``gcp`` or ``azure``."""
    secrets_cache_ttl: float = 60.0
    """Seconds a resolved value is reused before the backend is asked again; 0 disables."""
    secrets_env_prefix: str = "REXEC_SECRET_"
    """env backend: secret ``name`` is the agent's variable ``<prefix><name>``."""
    secrets_path: str = "/etc/rexec/secrets"
    """file backend: a directory with one file per secret (a Kubernetes Secret volume), or a
    JSON file holding an object of name to value."""
    secrets_vault_url: str = ""
    """vault backend: the server; empty means ``VAULT_ADDR``."""
    secrets_vault_token: str = ""
    """vault backend: a token; empty means ``VAULT_TOKEN``, or Kubernetes auth with a role."""
    secrets_vault_role: str = ""
    """vault backend: Kubernetes auth role (``VAULT_AUTH_ROLE`` when empty)."""
    secrets_vault_auth_mount: str = "kubernetes"
    secrets_vault_jwt_path: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    secrets_vault_mount: str = "secret"
    """vault backend: mount point of the KV version 2 engine."""
    secrets_vault_path: str = "rexec"
    """vault backend: secret ``name`` is read at ``<mount>/data/<path>/<name>``."""
    secrets_vault_field: str = "value"
    """vault backend: the key holding the value; a secret without it is used whole, as JSON."""
    secrets_name_prefix: str = ""
    """aws, gcp and azure backends: secret ``name`` is looked up as ``<prefix><name>``."""
    secrets_aws_region: str = ""
    """aws backend: empty means boto3's own (``AWS_REGION``, the instance's region...)."""
    secrets_gcp_project: str = ""
    """gcp backend: empty means ``GOOGLE_CLOUD_PROJECT`` or the credentials' project."""
    secrets_azure_vault_url: str = ""
    """azure backend: ``https://<vault>.vault.azure.net``; empty means ``AZURE_KEYVAULT_URL``."""


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
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid rexec setting: {exc} (check the REXEC_* variables)") from None
    if settings.agent_credentials not in AGENT_CREDENTIALS:
        raise ValueError(
            f"invalid rexec setting: REXEC_AGENT_CREDENTIALS={settings.agent_credentials!r}; "
            f"use one of {', '.join(AGENT_CREDENTIALS)}"
        )
    if not 1 <= settings.tasks_per_message <= 256:
        raise ValueError(
            f"invalid rexec setting: REXEC_TASKS_PER_MESSAGE={settings.tasks_per_message}; "
            "use 1 to 256"
        )
    if not 0 <= settings.outbox_lease <= 3600:
        raise ValueError(
            f"invalid rexec setting: REXEC_OUTBOX_LEASE={settings.outbox_lease}; "
            "use 0 (the relay publishes everything) to 3600 seconds"
        )
    if not 0 <= settings.kill_grace <= 3600:
        raise ValueError(
            f"invalid rexec setting: REXEC_KILL_GRACE={settings.kill_grace}; "
            "use 0 (SIGKILL at once) to 3600 seconds"
        )
    if not 0 < settings.api_read_timeout <= 3600:
        raise ValueError(
            f"invalid rexec setting: REXEC_API_READ_TIMEOUT={settings.api_read_timeout}; "
            "use more than 0 and at most 3600 seconds"
        )
    if settings.api_max_connections < 1:
        raise ValueError(
            f"invalid rexec setting: REXEC_API_MAX_CONNECTIONS={settings.api_max_connections}; "
            "use 1 or more"
        )
    check_redis_url(settings.redis_url)  # a RedisURLError (a ValueError) names what is wrong
    return settings


AGENT_CREDENTIALS = ("scoped", "shared")


def key_list(value: str) -> list[str]:
    """A comma-separated setting as a list, blanks dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]
