"""Encryption in transit: a real agent over ``amqps://``, ``rediss://`` and HTTPS, nothing else.

The test makes a CA and a server certificate for 127.0.0.1/localhost, starts a private RabbitMQ
node and a private Redis that listen with TLS only, and a real ``rexec serve`` over HTTPS. A real
``rexec-agent`` runs a task through all three. Plain TCP gets nowhere, and an agent that trusts
the wrong CA stops at once with an error naming the certificate check that failed and what to set.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rexec.client import RexecClient, RexecError, cli
from rexec.schemas.api import SubmitTask, TaskState
from rexec.schemas.settings import load_settings
from tests.conftest import BOOTSTRAP_KEY
from tests.e2e.conftest import Plane
from tests.faults.certs import ServerCert, make_other_ca, make_server_cert
from tests.faults.servers import PrivateRabbit, PrivateRedis
from tests.support import Process, free_port, python_entry, wait_until

pytestmark = pytest.mark.timeout(90)

ALLOW = ["--allow", "tests.tasks:*", "--allow", "echo"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return make_server_cert(tmp_path_factory.mktemp("tls") / "certs")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_other_ca(tmp_path_factory.mktemp("tls-other"))


@pytest.fixture(scope="module")
def tls_rabbit(run_id: str, certs: ServerCert) -> Iterator[PrivateRabbit]:
    rabbit = PrivateRabbit(f"rexec-tls-{run_id}", tls=certs)
    try:
        rabbit.start()
        yield rabbit
    finally:
        rabbit.cleanup()


@pytest.fixture(scope="module")
def tls_redis(certs: ServerCert) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tls=certs)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def plane(
    tmp_path_factory: pytest.TempPathFactory,
    certs: ServerCert,
    tls_rabbit: PrivateRabbit,
    tls_redis: PrivateRedis,
) -> Iterator[Plane]:
    logs = tmp_path_factory.mktemp("tls-plane")
    settings = load_settings(
        {},
        database_url=f"sqlite+aiosqlite:///{logs / 'rexec.db'}",
        amqp_url=tls_rabbit.amqp_url,
        management_url=tls_rabbit.management_url,
        redis_url=tls_redis.url,
        api_tls_cert=str(certs.cert),
        api_tls_key=str(certs.key),
        ca_file=str(certs.ca),
        heartbeat_ttl=2.0,
        watchdog_interval=0.5,
        api_key=BOOTSTRAP_KEY,
    )
    plane = Plane(settings, logs)
    yield plane
    plane.close()


@pytest.fixture(scope="module")
def pool(plane: Plane) -> str:
    plane.client.create_pool("tls")
    return "tls"


def test_an_agent_runs_tasks_over_amqps_rediss_and_https(
    plane: Plane, pool: str, tls_rabbit: PrivateRabbit, tls_redis: PrivateRedis
) -> None:
    assert plane.settings.api_url.startswith("https://")
    assert plane.env["REXEC_AMQP_URL"].startswith("amqps://")
    assert plane.env["REXEC_REDIS_URL"].startswith("rediss://")
    agent = plane.start_agent(pool, *ALLOW)
    ids = plane.client.submit_many(
        [
            SubmitTask(pool=pool, target="tests.tasks:add", args=[2, 3]),
            SubmitTask(pool=pool, command=["echo", "over", "tls"]),
        ]
    )
    done = plane.client.wait(ids, timeout=30)
    assert [t.state for t in done] == [TaskState.SUCCEEDED] * 2, (done, agent.output()[-3000:])
    assert done[0].result == 5
    # The broker says the agent's and the dispatcher's connections are TLS.
    connections = tls_rabbit.connections()
    agents = [tls for name, tls in connections.items() if name.startswith(f"rexec-agent {pool}/")]
    assert agents == [True], connections
    assert all(connections.values()), connections
    # And the agent's heartbeat is in the TLS-only Redis.
    client = redis.Redis.from_url(tls_redis.url)
    try:
        assert list(client.scan_iter(f"{plane.settings.redis_prefix}:agent:*"))
    finally:
        client.close()


def test_plain_tcp_gets_nowhere(
    plane: Plane, tls_rabbit: PrivateRabbit, tls_redis: PrivateRedis
) -> None:
    plain_redis = redis.Redis(
        host="127.0.0.1", port=tls_redis.port, socket_timeout=5, retry=Retry(NoBackoff(), 0)
    )
    try:
        with pytest.raises(redis.ConnectionError):
            plain_redis.ping()
    finally:
        plain_redis.close()
    # The broker has no plain listener: an AMQP header on its port gets no AMQP answer.
    with socket.create_connection(("127.0.0.1", tls_rabbit.port), timeout=5) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        assert not sock.recv(64).startswith(b"\x01\x00\x00")  # no Connection.Start frame
    # Plain HTTP to the HTTPS API gets no answer.
    plain_api = plane.settings.api_url.replace("https://", "http://")
    with RexecClient(plain_api, ca_file="") as rexec, pytest.raises(RexecError):
        rexec.list_pools()


def test_a_client_without_the_ca_names_the_certificate_problem(
    plane: Plane, other_ca: Path
) -> None:
    with (
        RexecClient(plane.settings.api_url, ca_file=str(other_ca)) as rexec,
        pytest.raises(RexecError) as refused,
    ):
        rexec.list_pools()
    message = refused.value.message
    assert "TLS certificate check of the rexec API" in message, message
    assert "REXEC_CA_FILE" in message, message
    with pytest.raises(RexecError, match=r"REXEC_CA_FILE=/nonexistent/ca\.pem: cannot load"):
        RexecClient(plane.settings.api_url, ca_file="/nonexistent/ca.pem")


def test_agents_that_trust_the_wrong_ca_stop_with_a_clear_error(
    plane: Plane, pool: str, certs: ServerCert, other_ca: Path
) -> None:
    """One wrong CA each for the API, RabbitMQ and Redis: each agent exits non-zero at once
    (not after a retry deadline) and says which certificate check failed and what to set;
    so does ``rexec serve`` whose broker URL trusts the wrong CA."""
    wrong = str(other_ca)
    cases = {
        "api": ({"REXEC_CA_FILE": wrong}, "the rexec API at https://", "set REXEC_CA_FILE"),
        "amqp": (
            {"REXEC_AMQP_URL": plane.env["REXEC_AMQP_URL"].replace(str(certs.ca), wrong)},
            "RabbitMQ at amqps://",
            "?cafile=",
        ),
        "redis": (
            {"REXEC_REDIS_URL": plane.env["REXEC_REDIS_URL"].replace(str(certs.ca), wrong)},
            "Redis at rediss://",
            "?ssl_ca_certs=",
        ),
    }
    agents = {
        name: plane.start_agent(pool, *ALLOW, name=f"wrong-ca-{name}", env=env)
        for name, (env, _, _) in cases.items()
    }
    # And a dispatcher whose broker URL trusts the wrong CA.
    serve = Process(
        [*python_entry("rexec.client.cli"), "serve"],
        {
            **plane.env,
            **cases["amqp"][0],
            "REXEC_API_PORT": str(free_port()),
            "REXEC_DATABASE_URL": f"sqlite+aiosqlite:///{plane.logs / 'wrong-ca.db'}",
        },
        plane.logs / "wrong-ca-serve.log",
    )
    plane.processes.append(serve)
    # Well within registration's retry window (RETRY_FOR, 120 s): a refused certificate is
    # not retried as if the API were down.
    wait_until(
        lambda: all(p.popen.poll() is not None for p in [*agents.values(), serve]),
        20,
        "the agents and the dispatcher with the wrong CA to exit",
    )
    assert serve.popen.returncode == 1, serve.output()[-2000:]
    assert "rexec serve: TLS certificate check of RabbitMQ at amqps://guest:***@" in serve.output()
    for name, (_, where, hint) in cases.items():
        output = agents[name].output()
        assert agents[name].popen.returncode == 1, (name, output[-2000:])
        assert f"rexec-agent: TLS certificate check of {where}" in output, (name, output[-2000:])
        untrusted = ("self-signed certificate in certificate chain", "unable to get local issuer")
        assert any(reason in output for reason in untrusted), (name, output[-2000:])
        assert hint in output, (name, output[-2000:])


def test_serve_refuses_half_a_tls_configuration(
    monkeypatch: pytest.MonkeyPatch, certs: ServerCert, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REXEC_API_TLS_CERT", str(certs.cert))
    monkeypatch.delenv("REXEC_API_TLS_KEY", raising=False)
    assert cli.main(["serve"]) == 2
    assert "REXEC_API_TLS_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("REXEC_API_TLS_KEY", str(certs.ca))  # a certificate, not its key
    assert cli.main(["serve"]) == 2
    assert "do not load as a certificate chain and its private key" in capsys.readouterr().err
