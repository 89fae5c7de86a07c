"""Encryption in transit: the API's CA bundle, the server's certificate, and clear TLS errors.

RabbitMQ and Redis take their TLS options in their URLs (``amqps://…?cafile=…``,
``rediss://…?ssl_ca_certs=…``), read by aiormq and redis-py themselves, so every connection
factory built on those URLs gets TLS for free. The API's clients verify its HTTPS certificate
against ``REXEC_CA_FILE`` when set, otherwise against ``SSL_CERT_FILE`` or certifi (httpx's
default). A failed certificate check is never retried as if the server were down: it is
reported with what failed and what to set.
"""

from __future__ import annotations

import ssl
from pathlib import Path

CA_HINTS = {
    "api": "set REXEC_CA_FILE to the PEM bundle of the CA that signed the API's certificate",
    "amqp": "add ?cafile=/path/to/ca.pem to REXEC_AMQP_URL (or set SSL_CERT_FILE)",
    "redis": "add ?ssl_ca_certs=/path/to/ca.pem to REXEC_REDIS_URL (or set SSL_CERT_FILE)",
}
"""What to set when the server's certificate is not trusted, per service."""
HOSTNAME_MISMATCH = 62
"""OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH: the certificate is trusted but names another host."""


class TLSConfigError(ValueError):
    """A TLS setting names a file that cannot be used; the text says which and why."""


def http_verify(ca_file: str) -> ssl.SSLContext | bool:
    """httpx's ``verify`` for the API: the CA bundle of ``REXEC_CA_FILE``, else httpx's default."""
    if not ca_file:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(
            f"REXEC_CA_FILE={ca_file}: cannot load it as a CA bundle ({_reason(exc)}); "
            "set it to a readable PEM file holding the CA certificate(s) to trust"
        ) from None


def server_files(cert_file: str, key_file: str) -> tuple[str, str] | None:
    """The API's certificate and key when HTTPS is configured (both or neither), checked now,
    so a bad file is a clear error at startup rather than a failed handshake later."""
    if not cert_file and not key_file:
        return None
    if not cert_file or not key_file:
        missing = "REXEC_API_TLS_CERT" if not cert_file else "REXEC_API_TLS_KEY"
        raise TLSConfigError(
            f"HTTPS needs both REXEC_API_TLS_CERT and REXEC_API_TLS_KEY; {missing} is not set"
        )
    for name, path in (("REXEC_API_TLS_CERT", cert_file), ("REXEC_API_TLS_KEY", key_file)):
        if not Path(path).is_file():
            raise TLSConfigError(f"{name}={path}: no such file; set it to a PEM file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(
            f"REXEC_API_TLS_CERT={cert_file} and REXEC_API_TLS_KEY={key_file} do not load as a "
            f"certificate chain and its private key ({_reason(exc)}); both must be PEM, the key "
            "unencrypted and matching the certificate"
        ) from None
    return cert_file, key_file


def certificate_problem(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc`` (httpx, aiormq and redis-py wrap it), if there is one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def describe(problem: ssl.SSLError, service: str, where: str) -> str:
    """One line naming what failed (certificate check, or the handshake) and what to set."""
    if isinstance(problem, ssl.SSLCertVerificationError):
        what = problem.verify_message or _reason(problem)
        hint = CA_HINTS[service]
        if problem.verify_code == HOSTNAME_MISMATCH:
            hint = "use a host name the certificate names in the URL, or reissue the certificate"
        return f"TLS certificate check of {where} failed: {what}; {hint}"
    return (
        f"TLS handshake with {where} failed: {_reason(problem)}; check that the server speaks "
        "TLS on that port and that the URL's scheme matches (amqps://, rediss://, https://)"
    )


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # set by OpenSSL; absent on hand-made SSLErrors
    if isinstance(exc, ssl.SSLError) and reason:
        return str(reason)
    return str(exc) or type(exc).__name__
