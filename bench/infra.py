"""Isolation of one system run on the shared RabbitMQ and Redis.

Each run (one system, one workload, one repetition) gets its own RabbitMQ vhost, created through
the management API and deleted afterwards, and its own Redis key prefix (in ``BENCH_REDIS_DB``),
whose keys are deleted afterwards. Nothing on the shared servers is restarted or reconfigured.

Environment (all optional): ``BENCH_AMQP_HOST`` (127.0.0.1:5672), ``BENCH_MANAGEMENT_URL``
(http://127.0.0.1:15672), ``BENCH_AMQP_USER``/``BENCH_AMQP_PASSWORD`` (guest/guest),
``BENCH_REDIS_HOST`` (127.0.0.1:6379), ``BENCH_REDIS_DB`` (0).
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pika
import pika.exceptions
import redis

AMQP_HOST = os.environ.get("BENCH_AMQP_HOST", "127.0.0.1:5672")
MANAGEMENT_URL = os.environ.get("BENCH_MANAGEMENT_URL", "http://127.0.0.1:15672")
AMQP_USER = os.environ.get("BENCH_AMQP_USER", "guest")
AMQP_PASSWORD = os.environ.get("BENCH_AMQP_PASSWORD", "guest")
REDIS_HOST = os.environ.get("BENCH_REDIS_HOST", "127.0.0.1:6379")
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "0"))

LOG_ROOT = Path(tempfile.gettempdir()) / "rexec-bench"


@dataclass(frozen=True)
class RunContext:
    """Where one system run lives. Systems build every client and worker from this."""

    run_id: str  # unique, e.g. "celery-w1-r1-1a2b3c"
    vhost: str
    amqp_url: str  # amqp://user:pass@host/<vhost>
    management_url: str
    management_auth: tuple[str, str]
    redis_url: str  # redis://host/<db>
    prefix: str  # every Redis key of the run starts with this (no trailing colon)
    log_dir: Path  # worker logs go here (kept after the run for post-mortems)

    @property
    def sink(self) -> str:
        """Where bench tasks record executions; pass it to bench.tasks functions."""
        return f"{self.redis_url}#{self.prefix}"

    def worker_env(self, index: int) -> dict[str, str]:
        """Environment every worker process of the run gets (tasks read BENCH_WORKER_INDEX)."""
        return {
            "BENCH_RUN_ID": self.run_id,
            "BENCH_AMQP_URL": self.amqp_url,
            "BENCH_REDIS_URL": self.redis_url,
            "BENCH_PREFIX": self.prefix,
            "BENCH_WORKER_INDEX": str(index),
            "PYTHONUNBUFFERED": "1",
        }


def management() -> httpx.Client:
    return httpx.Client(base_url=MANAGEMENT_URL, auth=(AMQP_USER, AMQP_PASSWORD), timeout=120)


def rabbitmq_version() -> str:
    with management() as api:
        response = api.get("/api/overview")
        response.raise_for_status()
        return str(response.json().get("rabbitmq_version", "?"))


def redis_version() -> str:
    client = redis.Redis.from_url(f"redis://{REDIS_HOST}/{REDIS_DB}")
    try:
        info = client.info("server")
        return str(info.get("redis_version", "?"))
    finally:
        client.close()


def check_services() -> None:
    """Fail early, naming the service, if RabbitMQ's management API or Redis does not answer."""
    try:
        rabbitmq_version()
    except httpx.HTTPError as exc:
        raise RuntimeError(
            f"RabbitMQ management API at {MANAGEMENT_URL} did not answer ({exc}); "
            "start RabbitMQ with the rabbitmq_management plugin or set BENCH_MANAGEMENT_URL"
        ) from exc
    try:
        redis_version()
    except redis.RedisError as exc:
        raise RuntimeError(
            f"Redis at {REDIS_HOST} did not answer ({exc}); start it or set BENCH_REDIS_HOST"
        ) from exc


@contextmanager
def isolated_run(label: str) -> Iterator[RunContext]:
    """A fresh vhost and Redis prefix for one run; both removed afterwards, also on errors."""
    run_id = f"{label}-{uuid.uuid4().hex[:6]}"
    vhost = f"bench-{run_id}"
    path = quote(vhost, safe="")
    log_dir = LOG_ROOT / run_id
    log_dir.mkdir(parents=True, exist_ok=True)
    with management() as api:
        _create_vhost(api, path)
        api.put(
            f"/api/permissions/{path}/{quote(AMQP_USER, safe='')}",
            json={"configure": ".*", "write": ".*", "read": ".*"},
        ).raise_for_status()
    ctx = RunContext(
        run_id=run_id,
        vhost=vhost,
        amqp_url=f"amqp://{AMQP_USER}:{AMQP_PASSWORD}@{AMQP_HOST}/{path}",
        management_url=MANAGEMENT_URL,
        management_auth=(AMQP_USER, AMQP_PASSWORD),
        redis_url=f"redis://{REDIS_HOST}/{REDIS_DB}",
        prefix=f"bench:{run_id}",
        log_dir=log_dir,
    )
    try:
        yield ctx
    finally:
        with management() as api:
            try:
                # rexec agents' broker users outlive the vhost: remove those granted on it.
                granted = api.get(f"/api/vhosts/{path}/permissions")
                for entry in granted.json() if granted.is_success else []:
                    if entry["user"].startswith("rexec-agent-"):
                        api.delete(f"/api/users/{quote(entry['user'], safe='')}")
                api.delete(f"/api/vhosts/{path}")
            except (httpx.TimeoutException, httpx.RemoteProtocolError) as exc:
                # A loaded broker answers after the management API gave up; it still deletes.
                print(f"bench: deleting vhost {vhost} not confirmed ({exc!r})")
        delete_redis_prefix(ctx.redis_url, ctx.prefix)


def _create_vhost(api: httpx.Client, path: str, timeout: float = 300.0) -> None:
    """PUT the vhost; on a loaded broker the answer can take longer than the management API
    waits (it then drops the request while the vhost still starts): wait until it exists."""
    try:
        api.put(f"/api/vhosts/{path}").raise_for_status()
        return
    except (httpx.TimeoutException, httpx.RemoteProtocolError):
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if api.get(f"/api/vhosts/{path}").status_code == 200:
                return
        except (httpx.TimeoutException, httpx.RemoteProtocolError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"RabbitMQ did not create vhost {path} within {timeout:.0f} s")


def delete_redis_prefix(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(f"{prefix}*", count=2000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
        # The agents' scoped Redis logins are named after the prefix too.
        users = [u for u in map(str, client.acl_users()) if u.startswith(f"{prefix}-")]
        if users:
            client.acl_deluser(*users)
    finally:
        client.close()


def consumer_count(amqp_url: str, queue: str) -> int:
    """Consumers on ``queue`` right now (a passive declare: exact, unlike the management stats)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        try:
            ok = channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return 0  # the queue does not exist yet
        return int(ok.method.consumer_count)
    finally:
        if connection.is_open:
            connection.close()


def wait_for_consumers(amqp_url: str, queue: str, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        try:
            seen = consumer_count(amqp_url, queue)
        except pika.exceptions.AMQPConnectionError:
            continue  # a loaded broker: the handshake timed out, look again
        if seen >= n:
            return
        time.sleep(0.1)
    raise TimeoutError(
        f"queue {queue!r} had {seen} consumers after {timeout:.0f} s, expected {n}: "
        "the workers did not start; see their logs"
    )
