"""Registration: the agent trades its token for an agent id (and its settings) at the API.

``POST /v1/agents/register`` with ``Authorization: Bearer <token>``. Refusals (401, 403, 404,
409) become a ``RegistrationError`` whose text is the server's own ``{"error": ...}`` message
plus what to do; the CLI prints it and exits non-zero. A server that cannot be reached, or
answers 5xx, is retried for two minutes (the API may be starting or loaded); a certificate it
refuses (``REXEC_CA_FILE``) is not retried: it will not fix itself.
"""

from __future__ import annotations

import logging
import ssl

import anyio
import httpx
import msgspec

from rexec.schemas import tls
from rexec.schemas.api import API_PREFIX, AgentRegister, AgentRegistered, ErrorBody
from rexec.schemas.settings import Settings

log = logging.getLogger("rexec.agent.registration")

RETRY_FOR = 120.0
REQUEST_TIMEOUT = 30.0
"""A registration creates the agent's broker and Redis users and its control queue: with 50
agents starting at once on a loaded two-core machine (bench W5) one took over 10 s."""

_HINTS = {
    401: "the token was refused: check REXEC_AGENT_TOKEN (it may be wrong, expired or revoked)",
    403: "the token does not allow this registration: a token reaches only its own pool",
    404: "the pool does not exist: create it first (rexec pool create <pool>)",
    409: "the registration conflicts with the pool's state",
}


class RegistrationError(Exception):
    """The agent could not register; the text says why and what to do."""


def register_url(settings: Settings) -> str:
    return f"{settings.api_url.rstrip('/')}{API_PREFIX}/agents/register"


async def register(
    settings: Settings,
    token: str,
    body: AgentRegister,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    retry_for: float = RETRY_FOR,
) -> AgentRegistered:
    url = register_url(settings)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    deadline = anyio.current_time() + retry_for
    delay = 0.2
    try:
        verify = tls.http_verify(settings.ca_file)
    except tls.TLSConfigError as exc:
        raise RegistrationError(str(exc)) from None
    async with httpx.AsyncClient(
        transport=transport, timeout=REQUEST_TIMEOUT, verify=verify
    ) as client:
        while True:
            try:
                response = await client.post(
                    url, content=msgspec.json.encode(body), headers=headers
                )
            except httpx.HTTPError as exc:
                problem = f"cannot reach the rexec API at {url}: {exc or type(exc).__name__}"
                hint = "check REXEC_API_URL and that the orchestration plane is running"
                if (tls_error := tls.certificate_problem(exc)) is not None:
                    problem, hint = tls.describe(tls_error, "api", f"the rexec API at {url}"), ""
                    if isinstance(tls_error, ssl.SSLCertVerificationError):
                        raise RegistrationError(problem) from None  # will not fix itself
            else:
                if response.is_success:
                    return _decode(response, url)
                message = _server_message(response)
                if response.status_code < 500:
                    hint = _HINTS.get(response.status_code, "")
                    raise RegistrationError(
                        f"registration refused by {url} ({response.status_code}): {message}"
                        + (f"; {hint}" if hint else "")
                    )
                problem = f"the rexec API at {url} failed ({response.status_code}): {message}"
                hint = "it may be starting or overloaded"
            if anyio.current_time() + delay > deadline:
                raise RegistrationError(f"{problem}; {hint}" if hint else problem)
            log.warning("registration failed, retrying", extra={"error": problem})
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _decode(response: httpx.Response, url: str) -> AgentRegistered:
    try:
        return msgspec.json.decode(response.content, type=AgentRegistered)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RegistrationError(
            f"the rexec API at {url} answered registration with an unexpected body: {exc}; "
            "are the agent and the orchestration plane of compatible versions?"
        ) from None


def _server_message(response: httpx.Response) -> str:
    try:
        return msgspec.json.decode(response.content, type=ErrorBody).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        text = response.text.strip()
        return text[:500] if text else response.reason_phrase
