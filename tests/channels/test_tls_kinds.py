"""TLS through the shared helper on the other listener kinds: byte stream, ASTM, DICOM.

Real channels on 127.0.0.1:0, real TLS clients (asyncio + ssl, pynetdicom), certificates made
with trustme at test time, a real DurableQueue.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from medagent.channels.base import ChannelContext, channel_kind
from medagent.channels.endpoint import EndpointError, parse_endpoint
from medagent.queue.durable import DurableQueue
from medagent.queue.records import CommitResult, DuplicatePolicy, InboundRecord, QueuedMessage

BOUND_S = 10.0


class Sink:
    def __init__(self, queue: DurableQueue) -> None:
        self.queue = queue

    def accept(self, record: InboundRecord, *, durable: bool, dedup: DuplicatePolicy,
               on_commit: Callable[[CommitResult], None] | None) -> None:
        self.queue.submit(record, on_commit or (lambda result: None), dedup)


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[DurableQueue]:
    q = DurableQueue(tmp_path / "queue.db")
    await q.open()
    yield q
    await q.close()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca, client_ca = trustme.CA(), trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    client_ca.cert_pem.write_to_path(tmp_path / "client-ca.pem")
    return {"ca": ca, "client_ca": client_ca, "server": tmp_path / "server.pem", "client_ca_pem": tmp_path / "client-ca.pem"}


@pytest.fixture
async def serve(queue: DurableQueue, tmp_path: Path) -> AsyncIterator[Callable[[str], Any]]:
    channels: list[Any] = []

    async def start(url: str) -> Any:
        endpoint = parse_endpoint(url)
        kind = channel_kind(endpoint.scheme)
        channel = kind.create("dev", endpoint, kind.parse_options(endpoint),
                              ChannelContext(sink=Sink(queue), data_dir=tmp_path))
        await channel.start()
        channels.append(channel)
        return channel

    yield start
    for channel in channels:
        await channel.stop()


def client_context(ca: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    return context


async def rows(queue: DurableQueue, count: int) -> list[QueuedMessage]:
    found: list[QueuedMessage] = []
    async with asyncio.timeout(BOUND_S):
        while len(found) < count:
            found += await queue.next_batch(count - len(found))
            if len(found) < count:
                await asyncio.sleep(0.01)
    return found


async def send_tls(port: int, context: ssl.SSLContext, data: bytes, expect: int = 0) -> bytes:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"), BOUND_S)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(expect), BOUND_S) if expect else b""
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), BOUND_S)
        except (ConnectionError, OSError, TimeoutError):
            pass


async def test_byte_stream_over_tls(serve, pki, queue: DurableQueue) -> None:
    channel = await serve(f"tcp://127.0.0.1:0?startChar=%02&endChar=%03&tlsCert={pki['server']}")
    await send_tls(channel.port, client_context(pki["ca"]), b"\x02reading 42\x03")
    (row,) = await rows(queue, 1)
    assert row.body == b"\x02reading 42\x03"


async def test_byte_stream_mutual_tls_allow_list(serve, pki, queue: DurableQueue) -> None:
    url = (f"tcp://127.0.0.1:0?startChar=%02&endChar=%03&tlsCert={pki['server']}"
           f"&tlsCa={pki['client_ca_pem']}&tlsClientAllow=CN=scale-1")
    channel = await serve(url)
    allowed = pki["client_ca"].issue_cert("scale-1.example", common_name="scale-1")
    refused = pki["client_ca"].issue_cert("scale-9.example", common_name="scale-9")
    await send_tls(channel.port, client_context(pki["ca"], refused), b"\x02refused\x03")
    await send_tls(channel.port, client_context(pki["ca"], allowed), b"\x02allowed\x03")
    (row,) = await rows(queue, 1)
    assert row.body == b"\x02allowed\x03"
    assert channel.stats()["tls_clients_refused"] == 1


async def test_astm_over_tls_answers_enq(serve, pki) -> None:
    channel = await serve(f"astm://127.0.0.1:0?tlsCert={pki['server']}")
    assert await send_tls(channel.port, client_context(pki["ca"]), b"\x05", expect=1) == b"\x06"  # ENQ -> ACK


async def test_byte_stream_certificate_rotation(serve, pki, tmp_path: Path, queue: DurableQueue) -> None:
    channel = await serve(f"tcp://127.0.0.1:0?startChar=%02&endChar=%03&tlsCert={pki['server']}")
    await send_tls(channel.port, client_context(pki["ca"]), b"\x02one\x03")
    new_ca = trustme.CA()
    new_ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "next.pem")
    os.replace(tmp_path / "next.pem", pki["server"])
    await send_tls(channel.port, client_context(new_ca), b"\x02two\x03")
    assert [row.body for row in await rows(queue, 2)] == [b"\x02one\x03", b"\x02two\x03"]


def test_tls_parameters_on_every_tcp_kind(pki) -> None:
    for scheme in ("astm", "tcp?startChar=%02&endChar=%03"):
        base = f"{scheme.split('?')[0]}://127.0.0.1:0?" + (scheme.split("?")[1] + "&" if "?" in scheme else "")
        parse_endpoint(base + f"tlsCert={pki['server']}")
        with pytest.raises(EndpointError, match="tlsKey"):
            channel_kind(scheme.split("?")[0]).parse_options(parse_endpoint(base + "tlsKey=/k.pem"))


async def test_dicom_echo_over_tls_and_rotation(serve, pki, tmp_path: Path) -> None:
    pytest.importorskip("pynetdicom")
    from pynetdicom import AE

    # dicom's options want tlsKey with tlsCert; trustme's PEM holds both
    channel = await serve(f"dicom://127.0.0.1:0?aet=MEDAGENT&tlsCert={pki['server']}&tlsKey={pki['server']}")

    def echo(ca: trustme.CA) -> int | None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = BOUND_S
        assoc = ae.associate("127.0.0.1", channel.port, ae_title="MEDAGENT",
                             tls_args=(client_context(ca), "127.0.0.1"))
        if not assoc.is_established:
            return None
        status = assoc.send_c_echo()
        assoc.release()
        return int(status.Status) if status else None

    assert await asyncio.to_thread(echo, pki["ca"]) == 0x0000
    new_ca = trustme.CA()
    new_ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "next.pem")
    os.replace(tmp_path / "next.pem", pki["server"])
    assert await asyncio.to_thread(echo, new_ca) == 0x0000
    assert await asyncio.to_thread(echo, pki["ca"]) is None  # the old certificate is gone


async def test_dicom_mutual_tls_allow_list(serve, pki) -> None:
    """tlsClientAllow on dicom://: an allowed modality echoes; another CA-signed one is refused,
    counted in the channel's stats, and the channel keeps serving."""
    pytest.importorskip("pynetdicom")
    from pynetdicom import AE

    channel = await serve(f"dicom://127.0.0.1:0?aet=MEDAGENT&tlsCert={pki['server']}&tlsKey={pki['server']}"
                          f"&tlsCa={pki['client_ca_pem']}&tlsClientAllow=CN=ct-1")
    allowed = pki["client_ca"].issue_cert("ct-1.example", common_name="ct-1")
    refused = pki["client_ca"].issue_cert("ct-9.example", common_name="ct-9")

    def echo(cert: trustme.LeafCert) -> int | None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = BOUND_S
        assoc = ae.associate("127.0.0.1", channel.port, ae_title="MEDAGENT",
                             tls_args=(client_context(pki["ca"], cert), "127.0.0.1"))
        if not assoc.is_established:
            return None
        status = assoc.send_c_echo()
        assoc.release()
        return int(status.Status) if status else None

    assert await asyncio.to_thread(echo, refused) is None
    assert await asyncio.to_thread(echo, allowed) == 0x0000
    assert channel.stats()["tls_clients_refused"] == 1


def test_dicom_allow_list_needs_client_ca(pki) -> None:
    with pytest.raises(EndpointError, match="needs tlsCa"):
        parse_endpoint(f"dicom://127.0.0.1:0?tlsCert={pki['server']}&tlsKey={pki['server']}&tlsClientAllow=CN=ct-1")
