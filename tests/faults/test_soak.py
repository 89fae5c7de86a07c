"""Two minutes of the randomized fault soak (``tests/faults/soak.py``; ``make soak`` runs
thirty): every kind of fault at random, seeded and printed, then every task checked against
the ledger of what ran."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.faults.servers import PrivatePostgres, PrivateRabbit, PrivateRedis
from tests.faults.soak import Services, Soak

MINUTES = 2.0


@pytest.mark.timeout(900)
def test_two_minutes_of_random_faults_lose_nothing_and_end_each_task_once(
    private_rabbit: PrivateRabbit,
    private_redis: PrivateRedis,
    private_postgres: PrivatePostgres,
    tmp_path: Path,
) -> None:
    seed = random.randrange(1 << 32)
    print(f"soak seed {seed}: python -m tests.faults.soak --minutes {MINUTES:g} --seed {seed}")
    services = Services(
        private_rabbit, private_redis, private_postgres, private_postgres.create_database()
    )
    soak = Soak(services, tmp_path, seed)
    try:
        report = soak.run(MINUTES)
    finally:
        soak.close()
    print(report.table())
    assert report.ok, f"seed {seed}\n{report.table()}\n{soak.plane.dump_logs()}"
    assert report.tasks > 100 and sum(report.faults.values()) >= 5
