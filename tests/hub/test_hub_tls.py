"""The hub over TLS (HTTPS + WSS) with a self-signed certificate made at test time."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from hubtest import SpecAgent, adt, hub_settings, msa, transmit

from medagent.hub import HubServer


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        from cryptography import x509  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )
        return cert, key
    return _with_cryptography(cert, key)


def _with_cryptography(cert: Path, key: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(private_key, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    return cert, key


async def test_token_and_websocket_over_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    client_context = ssl.create_default_context(cafile=str(cert))
    async with HubServer(hub_settings(tmp_path, tls_cert=cert, tls_key=key)) as hub:
        assert hub.url.startswith("https://") and hub.ws_url.startswith("wss://")
        credentials = await hub.store.add_agent("tls-lab")
        await hub.store.add_channel(credentials.agent_id, "adt", "mllp://0.0.0.0:2575")
        client = await SpecAgent.connected(hub, credentials, ssl_context=client_context)
        await client.send(transmit("adt", adt("TLS1"), "tls-1"))
        response = await client.recv_type("agent:transmit:response")
        assert msa(response["body"])[1:3] == ["AA", "TLS1"]
        await client.close()
