"""``REXEC_API_READ_TIMEOUT`` and ``REXEC_API_MAX_CONNECTIONS``: read, and refused when they
would switch the slow-client protection off by accident."""

from __future__ import annotations

import pytest

from rexec.schemas.settings import load_settings


def test_defaults_and_overrides() -> None:
    assert load_settings({}).api_read_timeout == 30.0
    assert load_settings({}).api_max_connections == 1000
    given = load_settings({"REXEC_API_READ_TIMEOUT": "2.5", "REXEC_API_MAX_CONNECTIONS": "64"})
    assert (given.api_read_timeout, given.api_max_connections) == (2.5, 64)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REXEC_API_READ_TIMEOUT", "0"),
        ("REXEC_API_READ_TIMEOUT", "-1"),
        ("REXEC_API_READ_TIMEOUT", "3601"),
        ("REXEC_API_MAX_CONNECTIONS", "0"),
    ],
)
def test_out_of_range_is_refused_by_name(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        load_settings({name: value})
