"""The Dramatiq broker and actors of the benchmark, for workers and submitter.

RabbitMQ broker with ``confirm_delivery=True`` (durable queues, persistent messages; Dramatiq
acks after the actor ran and its result was stored), the Results middleware on Redis (keys
under the run's prefix), Dramatiq's default middleware otherwise.

The work queue (and its delay queue) are quorum queues, as for the other systems, through a
one-method subclass of the broker (``BENCH_DRAMATIQ_QUEUE_TYPE=classic`` for Dramatiq's own
classic queues). Dramatiq sets a per-consumer prefetch, which quorum queues need.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from bench import tasks

QUEUE = "default"
QUEUE_TYPE = os.environ.get("BENCH_DRAMATIQ_QUEUE_TYPE", "quorum")


class QuorumRabbitmqBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker declaring its work and delay queues as quorum queues."""

    def _build_queue_arguments(self, queue_name: str) -> dict[str, object]:
        arguments: dict[str, object] = super()._build_queue_arguments(queue_name)  # type: ignore[no-untyped-call]
        arguments["x-queue-type"] = "quorum"
        return arguments


@dataclass
class DramatiqApp:
    broker: RabbitmqBroker
    backend: RedisBackend
    noop: dramatiq.Actor[[], None]
    stamp: dramatiq.Actor[[str, str], float]
    sleep: dramatiq.Actor[[str, float, str], str]


def build(amqp_url: str, redis_url: str, prefix: str) -> DramatiqApp:
    backend = RedisBackend(url=redis_url, namespace=f"{prefix}:dramatiq")  # type: ignore[no-untyped-call]
    broker_class = QuorumRabbitmqBroker if QUEUE_TYPE == "quorum" else RabbitmqBroker
    broker = broker_class(url=amqp_url, confirm_delivery=True)
    broker.add_middleware(Results(backend=backend, store_results=True))  # type: ignore[no-untyped-call]
    return DramatiqApp(
        broker=broker,
        backend=backend,
        noop=dramatiq.actor(actor_name="noop", broker=broker, queue_name=QUEUE)(tasks.noop),
        stamp=dramatiq.actor(actor_name="stamp", broker=broker, queue_name=QUEUE)(tasks.stamp),
        sleep=dramatiq.actor(actor_name="sleep", broker=broker, queue_name=QUEUE)(
            tasks.sleep_record
        ),
    )


def build_from_env() -> DramatiqApp:
    return build(
        os.environ["BENCH_AMQP_URL"], os.environ["BENCH_REDIS_URL"], os.environ["BENCH_PREFIX"]
    )
