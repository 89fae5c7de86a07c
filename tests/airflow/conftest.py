"""Fixtures for tests against a real Apache Airflow 3 (see tests/airflow/harness.py).

Airflow runs from the venv ``make airflow-venv`` builds (``$REXEC_AIRFLOW_VENV``, which ``make
pytest`` exports); without it these tests fail, never skip. Starting an Airflow takes about 45 s,
so an instance lives for the whole session (with ``--dist loadfile`` a file's tests share a
worker): ``local_airflow`` is the LocalExecutor one; ``airflow_factory`` starts others (the
RexecExecutor's tests) and stops them all when the session ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.airflow.harness import (
    AGENT_ENV_EXECUTOR,
    AirflowInstance,
    airflow_venv,
    copy_dags,
)

HERE = Path(__file__).resolve().parent
DAGS = HERE / "dags"
TEST_TIMEOUT = 900
"""pytest-timeout for each test here (pyproject's 120 s is for rexec's own tests): the first test
of a session also waits for Airflow to start, minutes on a loaded machine."""

AirflowFactory = Callable[..., AirflowInstance]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


@pytest.fixture(scope="session")
def airflow_venv_path() -> Path:
    try:
        return airflow_venv()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def airflow_factory(
    airflow_venv_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AirflowFactory]:
    """``airflow_factory(executor=..., env={...}, dags=...)``: a started AirflowInstance with its
    own home and a private copy of ``dags`` (default tests/airflow/dags); stopped, with all its
    children, at the session's end."""
    started: list[AirflowInstance] = []

    def start(
        executor: str = "LocalExecutor",
        env: Mapping[str, str] | None = None,
        dags: Path = DAGS,
        name: str = "airflow",
    ) -> AirflowInstance:
        home = tmp_path_factory.mktemp(name)
        instance = AirflowInstance(home, copy_dags(dags, home / "dags"), executor, env)
        started.append(instance)
        instance.start()
        return instance

    yield start
    for instance in reversed(started):
        instance.stop()


@pytest.fixture(scope="session")
def local_airflow(airflow_factory: AirflowFactory) -> AirflowInstance:
    """An Airflow with the LocalExecutor (and the ``agent_env`` executor for tasks that ask)."""
    return airflow_factory(executor="LocalExecutor," + AGENT_ENV_EXECUTOR, name="local-airflow")
