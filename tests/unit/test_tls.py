"""schemas/tls.py without services: setting checks, unwrapping wrapped TLS errors, messages."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import httpx
import pytest

from rexec.schemas import tls
from tests.faults.certs import ServerCert, make_server_cert


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return make_server_cert(tmp_path_factory.mktemp("certs"))


def test_http_verify_is_httpx_default_without_a_ca_file() -> None:
    assert tls.http_verify("") is True


def test_http_verify_loads_the_ca_file(certs: ServerCert) -> None:
    context = tls.http_verify(str(certs.ca))
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "rexec-test-ca"),),)]


@pytest.mark.parametrize("content", [None, "not a certificate\n"])
def test_a_ca_file_that_cannot_be_loaded_is_named(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_text(content)
    with pytest.raises(
        tls.TLSConfigError, match=re.escape(f"REXEC_CA_FILE={path}: cannot load it")
    ):
        tls.http_verify(str(path))


def test_server_files(certs: ServerCert, tmp_path: Path) -> None:
    assert tls.server_files("", "") is None
    assert tls.server_files(str(certs.cert), str(certs.key)) == (str(certs.cert), str(certs.key))
    with pytest.raises(tls.TLSConfigError, match="REXEC_API_TLS_CERT is not set"):
        tls.server_files("", str(certs.key))
    with pytest.raises(tls.TLSConfigError, match=r"REXEC_API_TLS_KEY=.*: no such file"):
        tls.server_files(str(certs.cert), str(tmp_path / "missing.key"))
    with pytest.raises(tls.TLSConfigError, match="do not load as a certificate chain"):
        tls.server_files(str(certs.cert), str(certs.ca))


def _verification_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code = code
    error.verify_message = message
    return error


def test_the_tls_error_is_found_behind_the_wrappers() -> None:
    cause = _verification_error(19, "self-signed certificate in certificate chain")
    try:
        try:
            raise cause
        except ssl.SSLError as exc:
            raise httpx.ConnectError(str(exc)) from exc
    except httpx.ConnectError as wrapped:
        assert tls.certificate_problem(wrapped) is cause
    assert tls.certificate_problem(ConnectionRefusedError(111, "refused")) is None


def test_messages_name_the_check_and_what_to_set() -> None:
    untrusted = _verification_error(19, "self-signed certificate in certificate chain")
    text = tls.describe(untrusted, "redis", "Redis at rediss://r:6380/0")
    assert text.startswith("TLS certificate check of Redis at rediss://r:6380/0 failed: self-")
    assert "?ssl_ca_certs=" in text
    mismatch = _verification_error(
        tls.HOSTNAME_MISMATCH, "Hostname mismatch, certificate is not valid for 'x'."
    )
    assert "use a host name the certificate names" in tls.describe(mismatch, "api", "the API")
    handshake = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    assert "TLS handshake with the API failed" in tls.describe(handshake, "api", "the API")
