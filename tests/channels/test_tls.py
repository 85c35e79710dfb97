"""TLS and mutual TLS on the MLLP listener and the outbound MLLP pool (issue 18 "TLS and auth").

Certificates are made at test time with trustme; the server is the real Hl7Channel on
127.0.0.1:0 with a real DurableQueue, clients are real TLS sockets (asyncio + ssl) or the real
MllpClientPool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import quote

import pytest
import trustme

from medagent.channels.endpoint import EndpointError, mllp_options, parse_endpoint, parse_remote
from medagent.channels.hl7 import Hl7Channel
from medagent.channels.mllp_client import MllpClientError, MllpClientPool
from medagent.proto.mllp import MllpDecoderPy, encode
from medagent.queue.durable import DurableQueue
from medagent.queue.records import CommitResult, DuplicatePolicy, InboundRecord

BOUND_S = 10.0


def msg(control_id: str) -> bytes:
    return (f"MSH|^~\\&|LAB|HOSP|MEDAGENT|CLOUD|20240101120000||ORU^R01^ORU_R01|{control_id}|P|2.5.1\r"
            "PID|1||12345||DOE^JANE\r").encode()


class Sink:
    def __init__(self, queue: DurableQueue) -> None:
        self.queue = queue

    def accept(self, record: InboundRecord, *, durable: bool, dedup: DuplicatePolicy,
               on_commit: Callable[[CommitResult], None] | None) -> None:
        assert durable and on_commit is not None
        self.queue.submit(record, on_commit, dedup)


class Pki:
    """A server CA and a client CA with their files in a temp dir."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = trustme.CA()
        self.client_ca = trustme.CA()
        self.server_pem = directory / "server.pem"
        self.ca_pem = directory / "ca.pem"
        self.client_ca_pem = directory / "client-ca.pem"
        self.ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(self.server_pem)
        self.ca.cert_pem.write_to_path(self.ca_pem)
        self.client_ca.cert_pem.write_to_path(self.client_ca_pem)

    def client_cert(self, common_name: str, ca: trustme.CA | None = None) -> trustme.LeafCert:
        return (ca or self.client_ca).issue_cert(f"{common_name}.example", common_name=common_name)

    def client_context(self, cert: trustme.LeafCert | None = None, ca: trustme.CA | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        (ca or self.ca).configure_trust(context)
        if cert is not None:
            cert.configure_cert(context)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    queue = DurableQueue(tmp_path / "queue.db")
    await queue.open()
    channels: list[Hl7Channel] = []

    async def start(**params: str) -> Hl7Channel:
        query = "&".join(f"{key}={quote(value, safe='/=,:')}" for key, value in {"ackMode": "fast", **params}.items())
        endpoint = parse_endpoint(f"mllp://127.0.0.1:0?{query}")
        channel = Hl7Channel("lab-in", endpoint, mllp_options(endpoint), Sink(queue))
        await channel.start()
        channels.append(channel)
        return channel

    yield start
    for channel in channels:
        await channel.stop(drain_timeout=1.0)
    await queue.close()


async def tls_exchange(channel: Hl7Channel, context: ssl.SSLContext, control_id: str) -> bytes:
    """Connect with TLS, send one message, return the ACK (AssertionError when closed first)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", channel.port, ssl=context, server_hostname="127.0.0.1"), BOUND_S)
    try:
        writer.write(encode(msg(control_id)))
        await writer.drain()
        decoder = MllpDecoderPy()
        async with asyncio.timeout(BOUND_S):
            while True:
                try:
                    data = await reader.read(65536)
                except (ConnectionError, ssl.SSLError) as exc:
                    raise AssertionError(f"connection failed: {exc}") from exc
                if not data:
                    raise AssertionError("connection closed before the ACK")
                frames = decoder.feed(data)
                if frames:
                    return frames[0]
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), BOUND_S)
        except (ConnectionError, OSError, TimeoutError):
            pass


async def test_mllp_over_tls_end_to_end(serve, pki: Pki) -> None:
    channel = await serve(tlsCert=str(pki.server_pem))
    assert b"MSA|AA|T1" in await tls_exchange(channel, pki.client_context(), "T1")
    assert channel.stats()["tls"] is True


async def test_plain_client_gets_no_ack_from_a_tls_listener(serve, pki: Pki) -> None:
    channel = await serve(tlsCert=str(pki.server_pem))
    reader, writer = await asyncio.open_connection("127.0.0.1", channel.port)
    writer.write(encode(msg("P1")))
    async with asyncio.timeout(BOUND_S):
        data = b""
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionError:
            pass
    writer.close()
    assert b"MSA" not in data
    assert channel.stats()["messages_received"] == 0


async def test_client_trusting_another_ca_fails(serve, pki: Pki) -> None:
    channel = await serve(tlsCert=str(pki.server_pem))
    with pytest.raises(ssl.SSLCertVerificationError):
        await tls_exchange(channel, pki.client_context(ca=trustme.CA()), "X1")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_tls_1_1_refused(serve, pki: Pki) -> None:
    channel = await serve(tlsCert=str(pki.server_pem))
    context = pki.client_context()
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_exchange(channel, context, "OLD1")
    assert channel.tls is not None and channel.tls.server_context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert channel.stats()["messages_received"] == 0
    assert b"MSA|AA|NEW1" in await tls_exchange(channel, pki.client_context(), "NEW1")


async def test_mutual_tls_allow_list(serve, pki: Pki, caplog) -> None:
    allowed = pki.client_cert("analyser-1")
    refused = pki.client_cert("intruder")
    other_ca = trustme.CA()
    by_fingerprint = pki.client_cert("analyser-2")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    fingerprint = x509.load_pem_x509_certificate(by_fingerprint.cert_chain_pems[0].bytes()).fingerprint(
        hashes.SHA256()).hex(":")
    channel = await serve(tlsCert=str(pki.server_pem), tlsCa=str(pki.client_ca_pem),
                          tlsClientAllow=f"CN=analyser-1,sha256:{fingerprint}")
    assert b"MSA|AA|M1" in await tls_exchange(channel, pki.client_context(allowed), "M1")
    assert b"MSA|AA|M2" in await tls_exchange(channel, pki.client_context(by_fingerprint), "M2")
    caplog.set_level(logging.WARNING, logger="medagent.channels.hl7")
    with pytest.raises(AssertionError, match="closed|failed"):  # handshaken, then closed unread
        await tls_exchange(channel, pki.client_context(refused), "M3")
    assert any("CN=intruder" in r.getMessage() and "tlsClientAllow" in r.getMessage() for r in caplog.records)
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):  # a certificate of another CA
        await tls_exchange(channel, pki.client_context(pki.client_cert("analyser-1", other_ca)), "M4")
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):  # no certificate at all
        await tls_exchange(channel, pki.client_context(), "M5")
    stats = channel.stats()
    assert stats["messages_received"] == 2 and stats["tls_clients_refused"] == 1


async def test_certificate_rotation_without_restart(serve, pki: Pki, caplog) -> None:
    channel = await serve(tlsCert=str(pki.server_pem))
    assert b"MSA|AA|R1" in await tls_exchange(channel, pki.client_context(), "R1")
    new_ca = trustme.CA()
    staged = pki.dir / "server.pem.new"
    new_ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(staged)
    os.replace(staged, pki.server_pem)  # the usual rename-into-place rotation
    assert b"MSA|AA|R2" in await tls_exchange(channel, pki.client_context(ca=new_ca), "R2")
    with pytest.raises(ssl.SSLCertVerificationError):  # the old certificate is no longer served
        await tls_exchange(channel, pki.client_context(), "R3")
    assert channel.stats()["tls_reloads"] == 1
    # a broken new file keeps the working certificate and logs one line, not one per handshake
    caplog.set_level(logging.ERROR, logger="medagent.channels.tls")
    pki.server_pem.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    for number in range(3):
        assert b"MSA|AA|B%d" % number in await tls_exchange(channel, pki.client_context(ca=new_ca), f"B{number}")
    assert len([r for r in caplog.records if "do not load" in r.getMessage()]) == 1


async def test_bad_certificate_file_fails_at_start(serve, pki: Pki, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("garbage")
    with pytest.raises(OSError, match="TLS"):
        await serve(tlsCert=str(bad))


def test_tls_parameters_are_checked(tmp_path: Path) -> None:
    with pytest.raises(EndpointError, match="tlsKey.*needs tlsCert"):
        parse_endpoint("mllp://127.0.0.1:0?tlsKey=/k.pem")
    with pytest.raises(EndpointError, match="tlsClientAllow.*needs tlsCa"):
        parse_endpoint("mllp://127.0.0.1:0?tlsCert=/c.pem&tlsClientAllow=CN=x")
    with pytest.raises(EndpointError, match="neither CN="):
        parse_endpoint("mllp://127.0.0.1:0?tlsCert=/c.pem&tlsCa=/a.pem&tlsClientAllow=bogus")
    assert parse_remote("mllp://h:1").tls is None
    assert parse_remote("mllp://h:1?tls=true").tls is not None
    with pytest.raises(EndpointError, match="tls"):
        parse_remote("mllp://h:1?tls=false&tlsCa=/a.pem")


# ------------------------------------------------------------------ outbound MLLP over TLS


@pytest.fixture
async def pool() -> AsyncIterator[MllpClientPool]:
    pool = MllpClientPool(connect_timeout_s=BOUND_S, response_timeout_s=BOUND_S)
    yield pool
    await pool.close()


async def test_outbound_push_over_tls(serve, pki: Pki, pool: MllpClientPool) -> None:
    channel = await serve(tlsCert=str(pki.server_pem))
    ack = await pool.send_bytes(f"mllp://127.0.0.1:{channel.port}?tlsCa={pki.ca_pem}", msg("O1"))
    assert b"MSA|AA|O1" in ack


async def test_outbound_verifies_the_server(serve, pki: Pki, pool: MllpClientPool) -> None:
    channel = await serve(tlsCert=str(pki.server_pem))
    other = pki.dir / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(other)
    with pytest.raises(MllpClientError, match="TLS handshake with .* failed"):
        await pool.send_bytes(f"mllp://127.0.0.1:{channel.port}?tlsCa={other}", msg("O2"))
    assert channel.stats()["messages_received"] == 0


async def test_outbound_with_client_certificate(serve, pki: Pki, pool: MllpClientPool) -> None:
    channel = await serve(tlsCert=str(pki.server_pem), tlsCa=str(pki.client_ca_pem),
                          tlsClientAllow="CN=medagent-out")
    client_pem = pki.dir / "client.pem"
    pki.client_cert("medagent-out").private_key_and_cert_chain_pem.write_to_path(client_pem)
    url = f"mllp://127.0.0.1:{channel.port}?tlsCa={pki.ca_pem}&tlsCert={client_pem}"
    assert b"MSA|AA|O3" in await pool.send_bytes(url, msg("O3"))
    with pytest.raises(MllpClientError):  # no client certificate: refused by the listener
        await pool.send_bytes(f"mllp://127.0.0.1:{channel.port}?tlsCa={pki.ca_pem}", msg("O4"), timeout=2.0)
