"""Celery worker of the benchmark: ``python -m bench.systems.celery_worker --pool P -c N``.

One OS process per worker (``threads`` or ``solo`` pool), consuming the ``bench`` queue.
Environment: ``BENCH_AMQP_URL``, ``BENCH_REDIS_URL``, ``BENCH_PREFIX``,
``BENCH_CELERY_PREFETCH_MULTIPLIER``, ``BENCH_WORKER_INDEX``.
"""

from __future__ import annotations

import argparse
import os

from bench.systems.celery_app import QUEUE, app_from_env

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pool", choices=["threads", "solo"], required=True)
    parser.add_argument("-c", "--concurrency", type=int, required=True)
    options = parser.parse_args()
    app = app_from_env()
    app.worker_main(
        [
            "worker",
            "--pool",
            options.pool,
            "--concurrency",
            str(options.concurrency),
            "--queues",
            QUEUE,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
            "--hostname",
            f"bench{os.environ.get('BENCH_WORKER_INDEX', '0')}@%h",
        ]
    )
