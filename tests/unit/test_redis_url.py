"""REXEC_REDIS_URL: plain URLs pass through, Sentinel URLs are parsed strictly."""

from __future__ import annotations

import pytest

from rexec.schemas.redis_url import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_SOCKET_TIMEOUT,
    RedisURLError,
    SentinelURL,
    check_redis_url,
    parse_sentinel_url,
)
from rexec.schemas.settings import load_settings


def test_a_full_sentinel_url() -> None:
    url = (
        "redis+sentinel://app:p%40ss@s1.example:26380,10.0.0.2,[::1]:26381/mymaster/3"
        "?sentinel_password=sp&socket_timeout=1.5&socket_connect_timeout=0.5"
    )
    assert parse_sentinel_url(url) == SentinelURL(
        sentinels=(("s1.example", 26380), ("10.0.0.2", 26379), ("::1", 26381)),
        service="mymaster",
        db=3,
        username="app",
        password="p@ss",
        sentinel_password="sp",
        socket_timeout=1.5,
        socket_connect_timeout=0.5,
    )


def test_defaults_and_a_password_without_a_user() -> None:
    spec = parse_sentinel_url("redis+sentinel://secret@127.0.0.1/mymaster")
    assert spec == SentinelURL(
        sentinels=(("127.0.0.1", 26379),),
        service="mymaster",
        password="secret",
        socket_timeout=DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout=DEFAULT_CONNECT_TIMEOUT,
    )
    assert parse_sentinel_url("REDIS+SENTINEL://h:1/svc/").service == "svc"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h1:26379,h2:26379", "service name"),
        ("redis+sentinel://h1:26379/", "service name"),
        ("redis+sentinel://h1:26379/mymaster/zero", "database 'zero' is not a number"),
        ("redis+sentinel://h1:26379/mymaster/0/extra", "too many segments"),
        ("redis+sentinel://h1:26379,,h2/mymaster", "address is empty"),
        ("redis+sentinel:///mymaster", "address is empty"),
        ("redis+sentinel://h1:port/mymaster", "bad port"),
        ("redis+sentinel://h1:70000/mymaster", "bad port"),
        ("redis+sentinel://:26379/mymaster", "has no host"),
        ("redis+sentinel://::1:26379/mymaster", "IPv6 address in brackets"),
        ("redis+sentinel://[::1/mymaster", "[IPv6]:port"),
        ("redis+sentinel://[::1]x/mymaster", "expected ':'"),
        ("redis+sentinel://h1/mymaster?master=x", "unknown option 'master'"),
        ("redis+sentinel://h1/mymaster?socket_timeout=0", "positive number of seconds"),
        ("redis+sentinel://h1/mymaster?socket_timeout=soon", "positive number of seconds"),
        ("redis+sentinel://h1/mymaster?socket_timeout=1&socket_timeout=2", "given twice"),
        ("redis+sentinel://h1/mymaster?novalue", "name=value pairs"),
        ("redis+sentinel://h1/mymaster#frag", "fragment"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_with_the_reason(url: str, says: str) -> None:
    with pytest.raises(RedisURLError) as caught:
        parse_sentinel_url(url)
    message = str(caught.value)
    assert says in message
    assert "REXEC_REDIS_URL" in message and "redis+sentinel://[user:password@]" in message


def test_errors_never_print_passwords() -> None:
    with pytest.raises(RedisURLError) as caught:
        parse_sentinel_url("redis+sentinel://u:hunter2@h1/?sentinel_password=sekrit")
    message = str(caught.value)
    assert "hunter2" not in message and "sekrit" not in message
    assert "u:***@h1" in message


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://h:6380/1", "unix:///run/redis.sock", "REDIS://h"],
)
def test_plain_urls_are_left_to_redis_py(url: str) -> None:
    check_redis_url(url)


@pytest.mark.parametrize("url", ["127.0.0.1:6379", "sentinel://h:26379", "http://h/"])
def test_an_unknown_scheme_is_refused(url: str) -> None:
    with pytest.raises(RedisURLError, match="no known scheme"):
        check_redis_url(url)


def test_settings_refuse_a_malformed_redis_url_at_load() -> None:
    with pytest.raises(ValueError, match="service name"):
        load_settings({"REXEC_REDIS_URL": "redis+sentinel://h1:26379"})
    good = "redis+sentinel://h1:26379,h2:26379/mymaster/0"
    assert load_settings({"REXEC_REDIS_URL": good}).redis_url == good
