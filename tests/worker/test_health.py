"""The agent's health server: /healthz, /readyz in each state, and /metrics counting tasks."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rexec.schemas import messages, names
from rexec.schemas.settings import Settings
from rexec.worker import agent as agent_module
from rexec.worker.agent import Agent, AgentError
from tests.conftest import AMQP_HOST, MANAGEMENT_URL
from tests.support import await_until, free_port, wait_until
from tests.worker.harness import Broker, running_agent, task, until

pytestmark = pytest.mark.anyio


def with_health(settings: Settings) -> tuple[Settings, int]:
    port = free_port()
    return msgspec.structs.replace(settings, health_port=port), port


@asynccontextmanager
async def health_client(port: int) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        yield client


async def test_ready_while_consuming_not_while_draining(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    settings, port = with_health(agent_settings)
    async with (
        running_agent(broker, settings, pool, drain_timeout=30) as agent,
        health_client(port) as http,
    ):
        live = await http.get("/healthz")
        ready = await http.get("/readyz")
        assert (live.status_code, ready.status_code) == (200, 200)
        assert ready.json() == {"status": "ok", "agent_id": agent.agent_id, "pool": pool}
        assert (await http.get("/nowhere")).status_code == 404
        assert (await http.post("/readyz")).status_code == 405

        slow = task(pool, "tests.tasks:sleep", args=[1.0])
        await broker.publish(pool, slow)
        await broker.wait_for(slow.task_id, messages.Started)
        agent.request_shutdown()  # the graceful drain, as on SIGTERM
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "unavailable"
        assert ready.json()["reason"].startswith("draining")
        assert (await http.get("/healthz")).status_code == 200, "draining is alive"
        assert isinstance(await broker.terminal(slow.task_id), messages.Succeeded)


@asynccontextmanager
async def broker_user(vhost: str) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """A broker user of the agent's own, so its access can be cut without the test's."""
    user = f"agent-{uuid.uuid4().hex[:10]}"
    async with httpx.AsyncClient(
        base_url=MANAGEMENT_URL, auth=("guest", "guest"), timeout=10
    ) as api:
        (
            await api.put(f"/api/users/{user}", json={"password": "pw", "tags": ""})
        ).raise_for_status()
        try:
            await grant(api, vhost, user)
            yield user, api
        finally:
            await api.delete(f"/api/users/{user}")


async def grant(api: httpx.AsyncClient, vhost: str, user: str) -> None:
    everything = {"configure": ".*", "write": ".*", "read": ".*"}
    path = f"/api/permissions/{quote(vhost, safe='')}/{user}"
    (await api.put(path, json=everything)).raise_for_status()


async def test_not_ready_while_the_broker_connection_is_down(
    broker: Broker,
    agent_settings: Settings,
    pool: str,
    vhost: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The agent's connection is closed (as the watchdog or a broker restart would) and it
    cannot reconnect for a while: /readyz says so, /healthz does not, and once the broker lets
    the agent back in it is ready again and runs tasks."""
    settings, port = with_health(agent_settings)
    async with broker_user(vhost) as (user, api):
        amqp_url = f"amqp://{user}:pw@{AMQP_HOST}/{quote(vhost, safe='')}"
        settings = msgspec.structs.replace(settings, amqp_url=amqp_url)
        async with running_agent(broker, settings, pool) as agent, health_client(port) as http:
            assert (await http.get("/readyz")).status_code == 200
            expected = names.agent_connection_name(pool, agent.agent_id, agent.hostname)

            async def connection() -> str | None:
                response = await api.get(f"/api/vhosts/{quote(vhost, safe='')}/connections")
                for conn in response.json():
                    if conn.get("client_properties", {}).get("connection_name") == expected:
                        return str(conn["name"])
                return None

            name = await await_until(connection, 15, f"connection {expected!r} to be listed")
            assert name is not None
            # No access to the vhost: reconnecting fails until it is granted again.
            await api.delete(f"/api/permissions/{quote(vhost, safe='')}/{user}")
            await api.delete(f"/api/connections/{quote(name, safe='')}")

            async def not_ready() -> httpx.Response | None:
                response = await http.get("/readyz")
                return response if response.status_code == 503 else None

            response = await await_until(not_ready, 10, "/readyz to report the lost connection")
            assert response is not None
            assert "RabbitMQ" in response.json()["reason"]
            assert (await http.get("/healthz")).status_code == 200
            # Still unready after the agent's reconnection attempts were refused.
            caplog.set_level(logging.WARNING, logger="aio_pika")

            def refused_twice() -> bool:
                attempts = [r for r in caplog.records if r.name == "aio_pika.robust_connection"]
                return sum("failed" in str(r.msg) for r in attempts) >= 2

            await until(refused_twice, 20, "two refused reconnection attempts")
            assert (await http.get("/readyz")).status_code == 503

            await grant(api, vhost, user)

            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            await await_until(ready, 20, "ready again after reconnecting")
            message = task(pool)
            await broker.publish(pool, message)
            assert isinstance(await broker.terminal(message.task_id, 20), messages.Succeeded)


async def test_metrics_count_a_succeeded_and_a_failed_task(
    broker: Broker, agent_settings: Settings, pool: str
) -> None:
    settings, port = with_health(agent_settings)
    async with (
        running_agent(broker, settings, pool, concurrency=3) as agent,
        health_client(port) as http,
    ):
        assert isinstance(await broker.run(pool, task(pool)), messages.Succeeded)
        assert isinstance(await broker.run(pool, task(pool, "tests.tasks:fail")), messages.Failed)
        await until(lambda: agent.stats.finished == 2, 5, "both attempts counted")

        response = await http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
        }

        def value(name: str, **labels: str) -> float:
            return samples[(name, tuple(sorted(labels.items())))]

        assert value("rexec_agent_tasks_total", pool=pool, outcome="succeeded") == 1
        assert value("rexec_agent_tasks_total", pool=pool, outcome="failed") == 1
        for outcome in (
            "timed_out",
            "cancelled",
            "expired",
            "not_allowed",
            "dead_lettered",
            "duplicate",
            "handed_back",
        ):
            assert value("rexec_agent_tasks_total", pool=pool, outcome=outcome) == 0, outcome
        assert value("rexec_agent_task_seconds_count", pool=pool, outcome="succeeded") == 1
        assert value("rexec_agent_task_seconds_count", pool=pool, outcome="failed") == 1
        assert value("rexec_agent_running", pool=pool) == 0
        assert value("rexec_agent_slots", pool=pool) == 3
        # agent_online, and started plus a terminal event for each task
        assert value("rexec_agent_events_total") >= 5
        assert 1 <= value("rexec_agent_event_batches_total") <= value("rexec_agent_events_total")
        assert value("rexec_agent_leases_lost_total") == 0
        assert value("rexec_agent_heartbeat_failures_total") == 0


async def test_health_port_in_use_is_a_clear_error(agent_settings: Settings, pool: str) -> None:
    with socket.create_server(("", 0)) as taken:
        port = taken.getsockname()[1]
        settings = msgspec.structs.replace(agent_settings, health_port=port)
        agent = Agent(settings, agent_id="a-port-taken", pool=pool, allow=["tests.tasks:*"])
        with pytest.raises(AgentError, match=rf"port {port}.*REXEC_HEALTH_PORT"):
            await agent.run()


def test_liveness_fails_only_once_a_shutdown_overran_its_drain(
    agent_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_module, "SHUTDOWN_GRACE", 0.0)
    monkeypatch.setattr(agent_module, "OFFLINE_TIMEOUT", 0.0)
    agent = Agent(agent_settings, agent_id="a-live", pool="p", allow=["x:*"], drain_timeout=0.05)
    assert agent.liveness() is None
    assert (agent.readiness() or "").startswith("starting")
    agent.request_shutdown()
    assert agent.liveness() is None, "within its drain deadline"
    assert (agent.readiness() or "").startswith("draining")
    wait_until(lambda: "past its drain deadline" in (agent.liveness() or ""), 5, "the deadline")
