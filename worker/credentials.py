"""Put the credentials issued at registration into the agent's own broker and Redis URLs.

The agent keeps the hosts, ports, vhost and TLS options its operator configured (the
orchestration plane cannot know how the customer's network reaches the servers) and swaps
in the user and password the orchestration plane created for it.
"""

from __future__ import annotations

from urllib.parse import quote

import msgspec
from yarl import URL

from rexec.schemas.api import AgentRegistered
from rexec.schemas.redis_url import is_sentinel
from rexec.schemas.settings import Settings, key_list


def with_login(url: str, user: str, password: str) -> str:
    """``url`` (or each of several comma-separated URLs) logging in as ``user``."""
    return ",".join(
        str(URL(part.strip()).with_user(user).with_password(password))
        for part in url.split(",")
        if part.strip()
    )


def with_redis_login(url: str, user: str, password: str) -> str:
    """``url`` logging in to Redis as ``user``; for a Sentinel URL, to the master it names."""
    if not is_sentinel(url):
        return with_login(url, user, password)
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    hosts = netloc.rpartition("@")[2]
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{hosts}{slash}{path}"


def registered_settings(settings: Settings, registered: AgentRegistered) -> Settings:
    """The agent's settings once registered: its heartbeat TTL, credentials and keys."""
    overrides: dict[str, object] = {"heartbeat_ttl": registered.heartbeat_ttl}
    scoped = registered.credentials
    if scoped is not None:
        overrides["amqp_url"] = with_login(
            settings.amqp_url, scoped.amqp_username, scoped.amqp_password
        )
        overrides["redis_url"] = with_redis_login(
            settings.redis_url, scoped.redis_username, scoped.redis_password
        )
    if not key_list(settings.signing_public_keys):  # pinned keys win over announced ones
        overrides["signing_public_keys"] = ",".join(registered.signing_public_keys)
    return msgspec.structs.replace(settings, **overrides)
