"""The Celery application of the benchmark: configuration and tasks, for workers and submitter.

Safety as the benchmark requires: RabbitMQ broker, durable quorum queue, persistent messages,
publisher confirms (``confirm_publish``), ``task_acks_late``, ``task_reject_on_worker_lost``,
results in Redis (keys under the run's prefix). Everything else is Celery's default except what
is listed in :data:`TUNING` (chosen for throughput, recorded with the results).
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Exchange, Queue

from bench import tasks

QUEUE = "bench"

TUNING: dict[str, object] = {
    "worker_send_task_events": False,
    "task_send_sent_event": False,
    "worker flags": "--without-gossip --without-mingle --without-heartbeat",
    "serializer": "json",
}


def make_app(amqp_url: str, redis_url: str, prefix: str, prefetch_multiplier: int = 4) -> Celery:
    app = Celery("bench", broker=amqp_url, backend=redis_url, set_as_current=False)
    exchange = Exchange(QUEUE, type="direct", durable=True)
    app.conf.update(
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        result_backend_transport_options={"global_keyprefix": f"{prefix}:"},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_queues=[
            Queue(
                QUEUE,
                exchange,
                routing_key=QUEUE,
                durable=True,
                queue_arguments={"x-queue-type": "quorum"},
            )
        ],
        task_default_queue=QUEUE,
        task_default_exchange=QUEUE,
        task_default_routing_key=QUEUE,
        task_default_delivery_mode="persistent",
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=prefetch_multiplier,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        result_expires=3600,
    )

    @app.task(name="bench.noop", shared=False)
    def noop() -> None:
        tasks.noop()

    @app.task(name="bench.stamp", shared=False)
    def stamp(bench_id: str, sink: str) -> float:
        return tasks.stamp(bench_id, sink)

    @app.task(name="bench.sleep", shared=False)
    def sleep(bench_id: str, seconds: float, sink: str) -> str:
        return tasks.sleep_record(bench_id, seconds, sink)

    return app


def app_from_env() -> Celery:
    return make_app(
        os.environ["BENCH_AMQP_URL"],
        os.environ["BENCH_REDIS_URL"],
        os.environ["BENCH_PREFIX"],
        int(os.environ.get("BENCH_CELERY_PREFETCH_MULTIPLIER", "4")),
    )
