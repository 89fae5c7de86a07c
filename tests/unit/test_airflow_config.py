"""The ``[rexec]`` section of Airflow's configuration (``rexec.airflow.config``): read without
Airflow, through a stand-in for the one method of Airflow's ``conf`` it calls."""

from __future__ import annotations

from pathlib import Path

import pytest

from rexec.airflow import config
from rexec.airflow.config import ConfigError, from_airflow


class Conf:
    """``conf.get(section, key, fallback=...)`` over a dict, as AirflowConfigParser answers."""

    def __init__(self, **options: str) -> None:
        self.options = options

    def get(self, section: str, key: str, fallback: str = "") -> str | None:
        assert section == config.SECTION
        return self.options.get(key, fallback)


def test_a_full_section(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    found = from_airflow(
        Conf(
            api_url="https://rexec.example.com/",
            api_key_file=str(key_file),
            pools="default=airflow, gpu = gpu-agents",
            default_pool="airflow",
            max_attempts="2",
            feed_wait="5",
        ),
        environ={"REXEC_API_KEY": "from-env"},
    )
    assert found.api_url == "https://rexec.example.com"
    assert found.api_key == "s3cret-key"  # the file wins over the environment
    assert found.pools == {"default": "airflow", "gpu": "gpu-agents"}
    assert (found.pool_for("gpu"), found.pool_for("other"), found.pool_for(None)) == (
        "gpu-agents",
        "airflow",
        "airflow",
    )
    assert found.all_pools == ["airflow", "gpu-agents"]
    assert (found.max_attempts, found.feed_wait, found.reconcile_interval) == (2, 5.0, 30.0)


def test_the_environment_fills_in_and_queues_map_to_pools_by_name() -> None:
    found = from_airflow(
        Conf(), environ={"REXEC_API_URL": "http://127.0.0.1:8600", "REXEC_API_KEY": "k"}
    )
    assert (found.api_url, found.api_key) == ("http://127.0.0.1:8600", "k")
    assert found.pool_for("etl") == "etl" and found.all_pools == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "api_url is not set"),
        ({"api_url": "http://x", "api_key": "k"}, "api_key is not read"),
        ({"api_url": "http://x", "pools": "default"}, "'default' is not 'queue=pool'"),
        ({"api_url": "http://x", "max_attempts": "0"}, "max_attempts = 0 is outside 1..100"),
        ({"api_url": "http://x", "feed_wait": "soon"}, "feed_wait = 'soon' is not a number"),
        ({"api_url": "http://x", "api_key_file": "/nonexistent/key"}, "cannot read it"),
    ],
)
def test_a_section_that_cannot_work_is_a_clear_error(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_airflow(Conf(**options), environ={})
