"""The feed, dashboard and HTTP endpoints over TLS (https/wss), and a warning for plain HTTP."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus

from reactor.core.errors import ConfigError
from reactor.testing.orchestrator import OrchestratorDouble
from reactor.web.feed import tls_context
from tests.integration.test_feed import bearer, feed_reactor, recv, token

pytestmark = pytest.mark.anyio


def self_signed(tmp: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "reactor test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def test_wss_with_a_trusted_certificate_and_plain_ws_refused(
    dsn: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=cert)
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url, tls_cert=cert, tls_key=key) as service:
        assert service.feed is not None
        port = service.feed.port
        assert service.feed.url.startswith("wss://")
        async with connect(f"wss://127.0.0.1:{port}/feed", ssl=trust, additional_headers=bearer(token())) as ws:
            assert (await recv(ws))["type"] == "snapshot"
        async with httpx.AsyncClient(verify=trust) as http:
            assert (await http.get(f"https://127.0.0.1:{port}/livez")).status_code == 200
        # a client that does not trust the certificate is refused by its own TLS check
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(f"wss://127.0.0.1:{port}/feed", additional_headers=bearer(token())):
                pass
        # plain ws on the TLS port: no websocket, no data
        with pytest.raises((InvalidMessage, InvalidStatus, ConnectionError, OSError)):
            async with connect(f"ws://127.0.0.1:{port}/feed", additional_headers=bearer(token()),
                               open_timeout=10):
                pass


def test_tls_needs_both_files_and_readable_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="both --tls-cert and --tls-key"):
        tls_context(str(tmp_path / "cert.pem"), None)
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        tls_context(str(tmp_path / "missing.pem"), str(tmp_path / "missing.key"))
    assert tls_context(None, None) is None


async def test_plain_http_beyond_loopback_is_announced(
    dsn: str, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="reactor.web.feed")
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url, host="0.0.0.0"):
        pass
    assert any("serving plain HTTP on 0.0.0.0" in r.getMessage() for r in caplog.records)
    caplog.clear()
    async with OrchestratorDouble() as orch, feed_reactor(dsn, orch.url):
        pass
    assert not any("plain HTTP" in r.getMessage() for r in caplog.records)
