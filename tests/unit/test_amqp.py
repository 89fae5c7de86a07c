"""REXEC_AMQP_URL: one broker URL or the nodes of one cluster, comma-separated."""

from __future__ import annotations

import pytest
from yarl import URL

from rexec.schemas.amqp import parse_amqp_urls, safe_url, vhost_of
from rexec.schemas.settings import load_settings


def test_one_url_is_one_node() -> None:
    assert parse_amqp_urls("amqp://u:p@n1:5672/vh") == (URL("amqp://u:p@n1:5672/vh"),)


def test_the_nodes_of_a_cluster_in_their_order() -> None:
    nodes = parse_amqp_urls(" amqp://u:p@n1:5672/vh , amqp://u:p@n2:5672/vh,amqps://u:p@n3:5671/vh")
    assert [(url.scheme, url.host, url.port) for url in nodes] == [
        ("amqp", "n1", 5672),
        ("amqp", "n2", 5672),
        ("amqps", "n3", 5671),
    ]


def test_a_comma_in_a_password_is_written_percent_encoded() -> None:
    [node] = parse_amqp_urls("amqp://u:a%2Cb@n1/")
    assert node.password == "a,b"


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("", "is empty"),
        (" , ", "is empty"),
        ("amqp://u:secret@n1/vh,,amqp://u:secret@n2/vh", "empty entry"),
        ("amqp://u:secret@n1/vh,", "empty entry"),
        ("http://u:secret@n1/vh", "not an amqp:// or amqps:// URL"),
        ("n1:5672", "not an amqp:// or amqps:// URL"),
        ("amqp:///vh", "with a host"),
        ("amqp://u:secret@n1:notaport/vh", "not a URL"),
        ("amqp://u:secret@n1/a,amqp://u:secret@n2/b", "different virtual hosts"),
    ],
)
def test_bad_urls_are_refused_by_name_without_the_password(value: str, complaint: str) -> None:
    with pytest.raises(ValueError, match="REXEC_AMQP_URL") as refused:
        parse_amqp_urls(value)
    assert complaint in str(refused.value)
    assert "secret" not in str(refused.value)


def test_settings_refuse_a_bad_amqp_url_at_load() -> None:
    assert load_settings({"REXEC_AMQP_URL": "amqp://a/,amqp://b/"}).amqp_url == (
        "amqp://a/,amqp://b/"
    )
    with pytest.raises(ValueError, match=r"REXEC_AMQP_URL.*empty entry"):
        load_settings({"REXEC_AMQP_URL": "amqp://a/,,amqp://b/"})


def test_safe_url_hides_the_password() -> None:
    assert safe_url("amqp://u:secret@n1:5672/vh") == "amqp://u:***@n1:5672/vh"
    assert safe_url("amqp://n1/") == "amqp://n1/"


@pytest.mark.parametrize(
    ("value", "vhost"),
    [
        ("amqp://n1/", "/"),
        ("amqp://n1", "/"),
        ("amqp://n1/%2F", "/"),
        ("amqp://n1/rexec-test-1,amqp://n2/rexec-test-1", "rexec-test-1"),
    ],
)
def test_the_virtual_host_of_the_nodes(value: str, vhost: str) -> None:
    assert vhost_of(value) == vhost
