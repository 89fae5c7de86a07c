"""Log grants: short-lived permission, signed by the orchestration plane, to read one attempt's log.

Task logs stay on the agent. The API issues a grant for one (task, attempt, agent) that expires
within a minute; the agent serves the log only against a grant its registration key verifies.
A grant is ``<base64 claims>.<signature>``. The signed bytes start with a purpose prefix, so a
grant's signature can never pass for the signature of anything else the same key signs (task
messages, say), and the reverse.
"""

from __future__ import annotations

import base64
import binascii
import time

import msgspec

from .signing import SignatureError, Signer, Verifier

PURPOSE = b"rexec-log-grant\x00"
GRANT_TTL = 60.0
"""Seconds a grant lives: long enough to open the stream, too short to be worth stealing."""


class GrantError(ValueError):
    """A grant that does not allow this read; the text says why."""


class LogGrantClaims(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    task_id: str
    attempt: int
    agent_id: str
    expires_at: float


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LogGrantClaims)


def issue(signer: Signer, claims: LogGrantClaims) -> str:
    payload = _encoder.encode(claims)
    encoded = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"{encoded}.{signer.sign(PURPOSE + payload)}"


def verify(
    verifier: Verifier,
    grant: str,
    *,
    task_id: str,
    attempt: int,
    agent_id: str,
    now: float | None = None,
) -> LogGrantClaims:
    """The grant's claims when it is genuine, unexpired and for exactly this read."""
    encoded, dot, signature = grant.strip().partition(".")
    if not dot or not encoded or not signature:
        raise GrantError("malformed log grant: expected '<claims>.<signature>'")
    try:
        payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        claims = _decoder.decode(payload)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise GrantError("malformed log grant: the claims cannot be decoded") from None
    try:
        verifier.verify(PURPOSE + payload, signature)
    except SignatureError as exc:
        raise GrantError(f"log grant refused: {exc}") from None
    if (claims.task_id, claims.attempt, claims.agent_id) != (task_id, attempt, agent_id):
        raise GrantError(
            f"log grant is for task {claims.task_id} attempt {claims.attempt} on agent "
            f"{claims.agent_id}, not task {task_id} attempt {attempt} on agent {agent_id}"
        )
    if claims.expires_at <= (time.time() if now is None else now):
        raise GrantError("log grant expired: ask the API for a new one (`rexec logs` does)")
    return claims
