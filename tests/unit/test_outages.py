"""Which errors are a database outage (wait and retry) and which are the statement's fault."""

from __future__ import annotations

import logging
import random

import pytest
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from rexec.dispatcher.backoff import Backoff
from rexec.dispatcher.outages import LoopHealth, database_outage


class _Orig(Exception):
    def __init__(self, sqlstate: str | None) -> None:
        super().__init__("orig")
        self.sqlstate = sqlstate


def dbapi(sqlstate: str | None, invalidated: bool = False) -> DBAPIError:
    return DBAPIError("SELECT 1", {}, _Orig(sqlstate), connection_invalidated=invalidated)


@pytest.mark.parametrize("code", ["57P01", "57P03", "08006", "08003", "53300", "55000", "25006"])
def test_server_states_of_a_restart_or_failover_are_outages(code: str) -> None:
    assert database_outage(dbapi(code))


@pytest.mark.parametrize("code", ["22021", "23505", "42P01", None])
def test_the_statements_own_faults_are_not(code: str | None) -> None:
    assert not database_outage(dbapi(code))


def test_a_cut_connection_operational_and_interface_errors_are_outages() -> None:
    assert database_outage(dbapi(None, invalidated=True))
    assert database_outage(OperationalError("SELECT 1", {}, _Orig(None)))
    assert database_outage(InterfaceError("SELECT 1", {}, _Orig(None)))


def test_an_os_error_is_an_outage_only_when_the_driver_raised_it() -> None:
    assert not database_outage(ConnectionRefusedError(111, "refused"))


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(base=0.25, cap=2.0, rng=random.Random(1))
    delays = [backoff.next() for _ in range(8)]
    assert all(0.125 <= d <= 2.0 for d in delays)
    assert delays[-1] >= 1.0, "grown towards the cap"
    backoff.reset()
    assert backoff.next() <= 0.25


def test_an_outage_is_logged_once_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    health = LoopHealth("relay", logging.getLogger("test.outages"))
    with caplog.at_level(logging.INFO, "test.outages"):
        for _ in range(3):
            health.failed(dbapi("57P03"))
        health.ok()
        health.ok()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert lines == [
        "database unreachable: the relay waits and tries again",
        "the relay works again",
    ]
