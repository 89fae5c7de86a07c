"""What ``REXEC_REDIS_URL`` may say: a plain Redis URL, or the Sentinels that know the master.

A plain URL (``redis://``, ``rediss://``, ``unix://``) goes to redis-py as it is. A Sentinel
URL names the Sentinels and the monitored service, in the form kombu and Celery made familiar:

    redis+sentinel://[user:password@]host1[:26379],host2[:26379]/<service>[/<db>]
        [?sentinel_password=...&socket_timeout=...&socket_connect_timeout=...]

``user:password`` authenticate to the Redis master; ``sentinel_password`` to the Sentinels
(when they have ``requirepass``). The port defaults to 26379, the database to 0. Parsing is
strict (pure, no I/O), so a typo fails at startup with a message naming what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

SENTINEL_SCHEME = "redis+sentinel"
PLAIN_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_SOCKET_TIMEOUT = 5.0
"""Seconds a command (or a Sentinel query) may take before it fails: a hung server must not
stall the heartbeat or the watchdog forever."""
DEFAULT_CONNECT_TIMEOUT = 2.0

FORM = "redis+sentinel://[user:password@]host1:26379,host2:26379/<service>[/<db>]"


class RedisURLError(ValueError):
    """A malformed ``REXEC_REDIS_URL``; the message says what is wrong and the expected form."""


@dataclass(frozen=True, slots=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT
    socket_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT


def is_sentinel(url: str) -> bool:
    return url.partition("://")[0].lower() == SENTINEL_SCHEME


def check_redis_url(url: str) -> None:
    """Raise ``RedisURLError`` unless ``url`` is a plain Redis URL or a valid Sentinel URL."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url)
    elif scheme not in PLAIN_SCHEMES:
        raise RedisURLError(
            f"REXEC_REDIS_URL {_redacted(url)!r} has no known scheme: use redis://host:6379/0, "
            f"rediss:// (TLS), unix:///path.sock, or {FORM}"
        )


def parse_sentinel_url(url: str) -> SentinelURL:
    try:
        parts = urlsplit(url)
    except ValueError:  # unbalanced brackets
        raise _error(url, "brackets do not match: write an IPv6 address as [IPv6]:port") from None
    if parts.scheme.lower() != SENTINEL_SCHEME:
        raise _error(url, f"the scheme must be {SENTINEL_SCHEME}://")
    if parts.fragment:
        raise _error(url, "a fragment (#...) has no meaning here")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username, password = _credentials(url, userinfo) if at else (None, None)
    sentinels = tuple(_sentinel(url, item) for item in hostlist.split(","))
    service, db = _path(url, parts.path)
    texts, seconds = _options(url, parts.query)
    return SentinelURL(
        sentinels=sentinels,
        service=service,
        db=db,
        username=username,
        password=password,
        sentinel_password=texts.get("sentinel_password"),
        socket_timeout=seconds.get("socket_timeout", DEFAULT_SOCKET_TIMEOUT),
        socket_connect_timeout=seconds.get("socket_connect_timeout", DEFAULT_CONNECT_TIMEOUT),
    )


def _credentials(url: str, userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    if not colon:
        # As in redis://secret@host: a lone userinfo is the password (Redis before ACLs).
        return None, unquote(user) or None
    return unquote(user) or None, unquote(password) or None


def _sentinel(url: str, item: str) -> tuple[str, int]:
    item = item.strip()
    if not item:
        raise _error(url, "a Sentinel address is empty (two commas, or none given)")
    if item.startswith("["):  # [ipv6]:port
        host, bracket, rest = item[1:].partition("]")
        if not bracket or not host:
            raise _error(url, f"{item!r} is not a valid [IPv6]:port address")
        if rest and not rest.startswith(":"):
            raise _error(url, f"{item!r}: expected ':' and a port after ']'")
        port_text = rest[1:] if rest else ""
    else:
        if item.count(":") > 1:
            raise _error(url, f"{item!r}: write an IPv6 address in brackets, [::1]:26379")
        host, _, port_text = item.partition(":")
        if not host:
            raise _error(url, f"{item!r} has no host")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _error(url, f"{item!r} has a bad port (a number from 1 to 65535)")
    return host, int(port_text)


def _path(url: str, path: str) -> tuple[str, int]:
    segments = path.split("/")[1:] if path.startswith("/") else []
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    if not segments or not segments[0]:
        raise _error(url, "the service name (Sentinel's 'monitor' name, e.g. mymaster) is missing")
    if len(segments) > 2:
        raise _error(url, "the path is /<service>/<db>: too many segments")
    service = unquote(segments[0])
    if len(segments) == 1:
        return service, 0
    if not segments[1].isdigit():
        raise _error(url, f"the database {segments[1]!r} is not a number")
    return service, int(segments[1])


_TEXT_OPTIONS = ("sentinel_password",)
_SECONDS_OPTIONS = ("socket_timeout", "socket_connect_timeout")


def _options(url: str, query: str) -> tuple[dict[str, str], dict[str, float]]:
    """The query's options: (text options, options in seconds); unknown ones are refused."""
    texts: dict[str, str] = {}
    seconds: dict[str, float] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _error(url, "the query is not name=value pairs joined by '&'") from None
    seen: set[str] = set()
    for name, value in pairs:
        if name in seen:
            raise _error(url, f"option {name!r} is given twice")
        seen.add(name)
        if name in _TEXT_OPTIONS:
            if value:
                texts[name] = value
        elif name in _SECONDS_OPTIONS:
            try:
                number = float(value)
            except ValueError:
                number = -1.0
            if not 0 < number < float("inf"):
                raise _error(url, f"option {name}={value!r} must be a positive number of seconds")
            seconds[name] = number
        else:
            known = ", ".join(_TEXT_OPTIONS + _SECONDS_OPTIONS)
            raise _error(url, f"unknown option {name!r} (known: {known})")
    return texts, seconds


def _error(url: str, why: str) -> RedisURLError:
    return RedisURLError(
        f"REXEC_REDIS_URL {_redacted(url)!r} is not a valid Sentinel URL: {why}. Expected {FORM}"
    )


def _redacted(url: str) -> str:
    """The URL with its password (if any) replaced, so errors never print secrets."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and userinfo:
        user, colon, _ = userinfo.partition(":")
        userinfo = f"{user}:***" if colon else "***"
        netloc = f"{userinfo}@{hosts}"
    if "sentinel_password=" in tail:
        head, _, query = tail.partition("?")
        pairs = [
            p if not p.startswith("sentinel_password=") else "sentinel_password=***"
            for p in query.split("&")
        ]
        tail = f"{head}?{'&'.join(pairs)}"
    return f"{scheme}{sep}{netloc}{slash}{tail}"
