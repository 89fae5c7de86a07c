"""Ed25519 signatures: the dispatcher signs what it sends to agents, agents verify before acting.

A broker account that may publish to a pool's queue (a leaked admin password, a misconfigured
permission) must still not be able to make agents run code: agents run only messages signed by
the orchestration plane's key. Keys travel as URL-safe base64 of their 32 raw bytes, so they fit
an environment variable or a Kubernetes secret. A verifier takes several public keys, so the
signing key can be rotated without stopping agents (add the new key, roll, drop the old one).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SIGNATURE_HEADER = "x-rexec-signature"
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{86}")
"""64 bytes in unpadded URL-safe base64."""
"""AMQP header carrying the signature of the message body."""


class SignatureError(ValueError):
    """A missing, malformed or wrong signature; the text says which."""


class KeyFormatError(ValueError):
    """A key that cannot be decoded; the text says what to do."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str, what: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise KeyFormatError(
            f"invalid {what}: expected URL-safe base64 of 32 bytes "
            "(make one with `rexec signing-key`)"
        )
    return raw


def generate_private_key() -> str:
    return _b64(Ed25519PrivateKey.generate().private_bytes_raw())


class Signer:
    def __init__(self, private_key: str) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(_unb64(private_key, "signing key"))
        self.public_key = _b64(self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign(self, data: bytes) -> str:
        return _b64(self._key.sign(data))


class Verifier:
    def __init__(self, public_keys: Iterable[str]) -> None:
        self._keys = [
            Ed25519PublicKey.from_public_bytes(_unb64(key, "signing public key"))
            for key in public_keys
        ]
        if not self._keys:
            raise KeyFormatError("a verifier needs at least one public key")

    def verify(self, data: bytes, signature: object) -> None:
        """Raise ``SignatureError`` unless ``signature`` is a valid signature of ``data``."""
        if signature is None:
            raise SignatureError("unsigned message: no x-rexec-signature header")
        if isinstance(signature, bytes):
            signature = signature.decode(errors="replace")
        if not isinstance(signature, str):
            raise SignatureError("malformed signature header: not text")
        if not _SIGNATURE.fullmatch(signature):
            raise SignatureError(
                "malformed signature header: not an Ed25519 signature in URL-safe base64"
            )
        raw = base64.urlsafe_b64decode(signature + "==")
        for key in self._keys:
            try:
                key.verify(raw, data)
                return
            except InvalidSignature:
                continue
        raise SignatureError(
            "bad signature: the message was altered or not signed by this orchestration plane"
        )
