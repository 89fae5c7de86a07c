"""Operator API keys: create (the secret is returned once), list, revoke, and look up.

Secrets are ``rexec_ak_`` plus 32 random bytes (URL-safe base64); only their SHA-256 is stored,
the same hashing as agent tokens, and lookups compare digests in constant time.
"""

from __future__ import annotations

import hmac
import secrets
import time
import uuid

from sqlalchemy import select

from rexec.schemas.api import ApiKeyCreate, ApiKeyCreated, ApiKeyView, Role

from .db.models import ApiKey
from .runtime import Runtime
from .service import Invalid, NotFound, credential_state, hash_secret

KEY_PREFIX = "rexec_ak_"
NAME_MAX = 200


def key_state(key: ApiKey, now: float) -> str:
    return credential_state(key.revoked_at, key.expires_at, now)


def key_view(key: ApiKey, now: float) -> ApiKeyView:
    return ApiKeyView(
        id=key.id,
        name=key.name,
        role=Role(key.role),
        prefix=key.prefix,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        expires_at=key.expires_at,
        state=key_state(key, now),
    )


async def create(rt: Runtime, body: ApiKeyCreate) -> ApiKeyCreated:
    if body.expires_in is not None and not body.expires_in > 0:
        raise Invalid(f"expires_in must be a positive number of seconds, got {body.expires_in}")
    if len(body.name) > NAME_MAX:
        raise Invalid(f"name must be at most {NAME_MAX} characters long")
    now = time.time()
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=uuid.uuid4().hex[:16],
        name=body.name,
        role=body.role.value,
        prefix=secret[:13],
        secret_hash=hash_secret(secret),
        created_at=now,
        last_used_at=None,
        expires_at=None if body.expires_in is None else now + body.expires_in,
        revoked_at=None,
    )
    async with rt.sessions.begin() as session:
        session.add(key)
    return ApiKeyCreated(key=key_view(key, now), secret=secret)


async def list_keys(rt: Runtime) -> list[ApiKeyView]:
    now = time.time()
    async with rt.sessions() as session:
        keys = await session.scalars(select(ApiKey).order_by(ApiKey.created_at.desc()))
        return [key_view(key, now) for key in keys]


async def revoke(rt: Runtime, key_id: str) -> ApiKeyView:
    """Revoke a key at once (revoking it again changes nothing)."""
    now = time.time()
    async with rt.sessions.begin() as session:
        key = await session.get(ApiKey, key_id)
        if key is None:
            raise NotFound(f"unknown API key {key_id!r}: list them with `rexec apikey list`")
        if key.revoked_at is None:
            key.revoked_at = now
    return key_view(key, now)


async def lookup(rt: Runtime, secret: str) -> ApiKey | None:
    """The stored key whose secret this is, whatever its state; None if there is none."""
    digest = hash_secret(secret)
    async with rt.sessions() as session:
        key = await session.scalar(select(ApiKey).where(ApiKey.secret_hash == digest))
    if key is None or not hmac.compare_digest(key.secret_hash, digest):
        return None
    return key


async def touch(rt: Runtime, key_id: str, now: float) -> None:
    """Record that the key was used (the caller rate-limits these writes)."""
    async with rt.sessions.begin() as session:
        key = await session.get(ApiKey, key_id)
        if key is not None:
            key.last_used_at = now
