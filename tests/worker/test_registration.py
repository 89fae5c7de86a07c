"""Registration: the token is sent as a bearer token, refusals become clear errors."""

from __future__ import annotations

import json
import ssl

import httpx
import msgspec
import pytest

from rexec.schemas.api import AgentRegister, AgentRegistered
from rexec.schemas.redis_url import parse_sentinel_url
from rexec.schemas.settings import load_settings
from rexec.worker.credentials import registered_settings, with_redis_login
from rexec.worker.registration import RegistrationError, register

pytestmark = pytest.mark.anyio

BODY = AgentRegister(pool="alpha", hostname="h", pid=1, concurrency=4, version=1, allow=["m:*"])


def transport(status: int, body: object, seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handle)


async def test_register_sends_token_and_body() -> None:
    seen: list[httpx.Request] = []
    answer = {
        "agent_id": "ag-1",
        "pool": "alpha",
        "heartbeat_ttl": 4.5,
        "protocol_version": 1,
        "protocol_minor": 1,
        "credentials": {
            "amqp_username": "rexec-agent-ag-1",
            "amqp_password": "pw1",
            "redis_username": "rexec-agent-ag-1",
            "redis_password": "pw2",
        },
        "signing_public_keys": ["k1"],
    }
    settings = load_settings({}, api_url="http://api.test:8600/")
    registered = await register(settings, "s3cret", BODY, transport=transport(200, answer, seen))
    assert registered.agent_id == "ag-1"
    assert registered.heartbeat_ttl == 4.5
    assert registered.credentials is not None
    assert registered.credentials.amqp_username == "rexec-agent-ag-1"
    assert registered.signing_public_keys == ["k1"]
    [request] = seen
    assert str(request.url) == "http://api.test:8600/v1/agents/register"
    assert request.headers["Authorization"] == "Bearer s3cret"
    assert json.loads(request.content) == {
        "pool": "alpha",
        "hostname": "h",
        "pid": 1,
        "concurrency": 4,
        "version": 1,
        "allow": ["m:*"],
    }


@pytest.mark.parametrize(
    ("status", "error", "hint"),
    [
        (401, "token revoked", "REXEC_AGENT_TOKEN"),
        (403, "token is for pool beta", "its own pool"),
        (404, "no pool named alpha", "rexec pool create"),
        (409, "pool alpha is draining", "conflicts"),
    ],
)
async def test_refusals_carry_the_server_message(status: int, error: str, hint: str) -> None:
    seen: list[httpx.Request] = []
    with pytest.raises(RegistrationError) as caught:
        await register(
            load_settings({}), "t", BODY, transport=transport(status, {"error": error}, seen)
        )
    text = str(caught.value)
    assert error in text and str(status) in text and hint in text
    assert len(seen) == 1, "refusals are not retried"


async def test_server_errors_are_retried_then_reported() -> None:
    seen: list[httpx.Request] = []
    with pytest.raises(RegistrationError, match="failed \\(503\\): down for maintenance"):
        await register(
            load_settings({}),
            "t",
            BODY,
            transport=transport(503, {"error": "down for maintenance"}, seen),
            retry_for=0.5,
        )
    assert len(seen) >= 2


async def test_unreachable_api_names_the_url() -> None:
    settings = load_settings({}, api_url="http://127.0.0.1:9")
    with pytest.raises(
        RegistrationError, match=r"cannot reach the rexec API at http://127\.0\.0\.1:9"
    ):
        await register(settings, "t", BODY, retry_for=0)


async def test_unexpected_body_is_an_error() -> None:
    seen: list[httpx.Request] = []
    with pytest.raises(RegistrationError, match="unexpected body"):
        await register(load_settings({}), "t", BODY, transport=transport(200, {"x": 1}, seen))


def test_registered_settings_log_in_with_the_issued_credentials() -> None:
    """The agent keeps its own hosts, vhost and options and swaps in the issued login."""
    registered = msgspec.convert(
        {
            "agent_id": "ag-1",
            "pool": "alpha",
            "heartbeat_ttl": 4.5,
            "protocol_version": 1,
            "credentials": {
                "amqp_username": "rexec-agent-ag-1",
                "amqp_password": "pw1",
                "redis_username": "rx-agent-ag-1",
                "redis_password": "pw2",
            },
            "signing_public_keys": ["k1", "k2"],
        },
        AgentRegistered,
    )
    settings = load_settings(
        {},
        amqp_url="amqps://guest:guest@n1:5671/prod?cafile=/ca.pem,amqps://n2:5671/prod",
        redis_url="rediss://redis:6380/2",
    )
    done = registered_settings(settings, registered)
    assert done.amqp_url == (
        "amqps://rexec-agent-ag-1:pw1@n1:5671/prod?cafile=/ca.pem,"
        "amqps://rexec-agent-ag-1:pw1@n2:5671/prod"
    )
    assert done.redis_url == "rediss://rx-agent-ag-1:pw2@redis:6380/2"
    assert done.heartbeat_ttl == 4.5
    assert done.signing_public_keys == "k1,k2"
    pinned = msgspec.structs.replace(settings, signing_public_keys="pinned")
    assert registered_settings(pinned, registered).signing_public_keys == "pinned"


def _tls_failure(error: ssl.SSLError, seen: list[httpx.Request]) -> httpx.MockTransport:
    """A transport failing as httpx does on a TLS error: ConnectError caused by the SSLError."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        raise httpx.ConnectError(str(error)) from error

    return httpx.MockTransport(handle)


async def test_an_untrusted_certificate_is_not_retried() -> None:
    error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] unable to get ...")
    error.verify_code, error.verify_message = 20, "unable to get local issuer certificate"
    seen: list[httpx.Request] = []
    settings = load_settings({}, api_url="https://api.test:8600")
    with pytest.raises(RegistrationError) as refused:
        await register(settings, "t", BODY, transport=_tls_failure(error, seen), retry_for=60)
    assert len(seen) == 1
    assert str(refused.value) == (
        "TLS certificate check of the rexec API at https://api.test:8600/v1/agents/register "
        "failed: unable to get local issuer certificate; set REXEC_CA_FILE to the PEM bundle "
        "of the CA that signed the API's certificate"
    )


async def test_a_failed_handshake_is_retried_then_named() -> None:
    seen: list[httpx.Request] = []
    settings = load_settings({}, api_url="https://api.test:8600")
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    with pytest.raises(RegistrationError, match="TLS handshake with the rexec API at https://"):
        await register(settings, "t", BODY, transport=_tls_failure(error, seen), retry_for=0.5)
    assert len(seen) > 1


def test_issued_redis_login_goes_to_the_master_behind_sentinel() -> None:
    url = with_redis_login(
        "redis+sentinel://old:pw@s1:26379,s2/mymaster/1?sentinel_password=x", "agent-a", "p-1"
    )
    assert url == "redis+sentinel://agent-a:p-1@s1:26379,s2/mymaster/1?sentinel_password=x"
    parsed = parse_sentinel_url(url)
    assert (parsed.username, parsed.password, parsed.db) == ("agent-a", "p-1", 1)
