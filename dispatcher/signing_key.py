"""The orchestration plane's task-signing key: from REXEC_SIGNING_KEY, or made once and shared.

Every dispatcher replica must sign with the same key, so a generated key is kept in the
metadata database (the first replica to start writes it; the others read it). Production sets
``REXEC_SIGNING_KEY`` from a secret instead, and rotates it with
``REXEC_SIGNING_EXTRA_PUBLIC_KEYS`` (see the README's security section).
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from rexec.schemas.settings import Settings, key_list
from rexec.schemas.signing import Signer, Verifier, generate_private_key

from .db.models import DispatcherKey

log = logging.getLogger("rexec.signing")

KEY_NAME = "task-signing"


async def load_signer(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> Signer:
    if settings.signing_key:
        return Signer(settings.signing_key)
    async with sessions() as session:
        stored = await session.get(DispatcherKey, KEY_NAME)
    if stored is None:
        try:
            async with sessions.begin() as session:
                session.add(
                    DispatcherKey(
                        name=KEY_NAME, value=generate_private_key(), created_at=time.time()
                    )
                )
            log.info("generated the task-signing key and stored it in the metadata database")
        except IntegrityError:
            pass  # another replica stored one first: use that
        async with sessions() as session:
            stored = await session.get(DispatcherKey, KEY_NAME)
        assert stored is not None
    return Signer(stored.value)


def announced_public_keys(settings: Settings, signer: Signer) -> list[str]:
    """What agents learn at registration: the current public key, then any for rotation."""
    extra = key_list(settings.signing_extra_public_keys)
    Verifier(extra or [signer.public_key])  # a malformed extra key fails at start, clearly
    return [signer.public_key, *(key for key in extra if key != signer.public_key)]
