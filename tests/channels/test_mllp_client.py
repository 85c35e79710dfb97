"""The outbound MLLP client pool against a real asyncio MLLP ACK server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from medagent.channels.base import OutboundReply, outbound_sender
from medagent.channels.mllp_client import MllpClientError, MllpClientPool
from medagent.proto import hl7 as hl7proto
from medagent.proto.mllp import MllpDecoderPy, encode
from medagent.records import HL7_V2_CONTENT_TYPE

BOUND_S = 5.0

Behaviour = Callable[["AckServer", bytes, asyncio.StreamWriter], Awaitable[None]]


def order(control_id: str) -> bytes:
    return (
        f"MSH|^~\\&|MEDAGENT|CLOUD|LIS|LAB|20240101120000||ORM^O01^ORM_O01|{control_id}|P|2.5.1\r"
        "PID|1||12345||DOE^JANE\rORC|NW|1\r"
    ).encode()


def ack_for(frame: bytes, code: str = "AA") -> bytes:
    return encode(hl7proto.build_ack(frame, code))


def msa_of(ack: bytes) -> tuple[str | None, str | None]:
    info = hl7proto.parse_ack(ack)
    return (None, None) if info is None else (info.code, info.control_id)


class AckServer:
    """A device: answers each frame according to `behaviour`; counts connections."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.connections = 0
        self.open = 0
        self.received: list[bytes] = []
        self.held: list[tuple[bytes, asyncio.StreamWriter]] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        self.open += 1
        decoder = MllpDecoderPy()
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    self.received.append(frame)
                    await self.behaviour(self, frame, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.close()
            self.tasks.discard(task)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


async def answer_aa(server: AckServer, frame: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(ack_for(frame))


async def answer_ca_then_aa(server: AckServer, frame: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(ack_for(frame, "CA") + ack_for(frame, "AA"))


async def answer_stray_then_aa(server: AckServer, frame: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(ack_for(order("SOMEONE-ELSE"), "AA") + ack_for(frame, "AA"))


async def answer_late(server: AckServer, frame: bytes, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(0.3)
    writer.write(ack_for(frame))


async def hang_up(server: AckServer, frame: bytes, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def answer_in_reverse_after_ten(server: AckServer, frame: bytes, writer: asyncio.StreamWriter) -> None:
    server.held.append((frame, writer))
    if len(server.held) == 10:
        for held_frame, held_writer in reversed(server.held):
            held_writer.write(ack_for(held_frame))
        server.held.clear()


async def answer_after_five(server: AckServer, frame: bytes, writer: asyncio.StreamWriter) -> None:
    server.held.append((frame, writer))
    if len(server.held) == 5:
        for held_frame, held_writer in server.held:
            held_writer.write(ack_for(held_frame))
        server.held.clear()


async def never_answer(server: AckServer, frame: bytes, writer: asyncio.StreamWriter) -> None:
    return None


Setup = Callable[..., Awaitable[tuple[MllpClientPool, AckServer, str]]]


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    pools: list[MllpClientPool] = []
    servers: list[AckServer] = []

    async def make(behaviour: Behaviour, query: str = "", **pool_options: Any) -> tuple[MllpClientPool, AckServer, str]:
        server = AckServer(behaviour)
        port = await server.start()
        servers.append(server)
        pool = MllpClientPool(**pool_options)
        pools.append(pool)
        return pool, server, f"mllp://127.0.0.1:{port}" + (f"?{query}" if query else "")

    yield make
    for pool in pools:
        await pool.close()
    for server in servers:
        await server.stop()


async def wait_until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(BOUND_S):
        while not predicate():
            await asyncio.sleep(0.005)


# ------------------------------------------------------------------ returnAck


async def test_send_returns_the_ack(setup: Setup) -> None:
    pool, server, url = await setup(answer_aa)
    ack = await pool.send(url, order("M1"))
    assert msa_of(ack) == ("AA", "M1")
    assert server.received == [order("M1")]
    stats = pool.stats()[url]
    assert stats["sent"] == 1 and stats["acked"] == 1 and stats["clients"] == 1 and stats["errors"] == 0


async def test_first_takes_the_commit_ack(setup: Setup) -> None:
    pool, _, url = await setup(answer_ca_then_aa)
    assert msa_of(await pool.send(url, order("F1"))) == ("CA", "F1")
    assert msa_of(await pool.send(url, order("F2"), "first")) == ("CA", "F2")


async def test_application_skips_ca(setup: Setup) -> None:
    pool, _, url = await setup(answer_ca_then_aa)
    assert msa_of(await pool.send(url, order("A1"), "application")) == ("AA", "A1")
    assert pool.stats()[url]["commit_acks_skipped"] == 1


async def test_return_ack_precedence(setup: Setup) -> None:
    pool, _, url = await setup(answer_ca_then_aa, query="defaultReturnAck=application")
    assert msa_of(await pool.send(url, order("D1"))) == ("AA", "D1")  # URL default
    assert msa_of(await pool.send(url, order("D2"), "first")) == ("CA", "D2")  # message wins
    with pytest.raises(MllpClientError, match="invalid returnAck 'sometimes'"):
        await pool.send(url, order("D3"), "sometimes")


async def test_missing_control_id(setup: Setup) -> None:
    pool, server, url = await setup(answer_aa)
    with pytest.raises(MllpClientError) as info:
        await pool.send(url, b"MSH|^~\\&|A|B|C|D|20240101||ORM^O01||P|2.5.1\r")
    assert str(info.value) == "MSH.10 is missing but required"
    with pytest.raises(MllpClientError, match="not an HL7 v2 message"):
        await pool.send(url, b"hello")
    assert server.received == []


async def test_bad_remote_url() -> None:
    pool = MllpClientPool()
    with pytest.raises(MllpClientError, match="mllp://"):
        await pool.send("http://127.0.0.1:1", order("U1"))
    await pool.close()


# ------------------------------------------------------------------ stray and late ACKs


async def test_mismatched_ack_is_discarded_and_counted(setup: Setup) -> None:
    pool, _, url = await setup(answer_stray_then_aa)
    assert msa_of(await pool.send(url, order("X1"))) == ("AA", "X1")
    assert pool.stats()[url]["mismatched"] == 1


async def test_response_timeout_then_late_ack(setup: Setup) -> None:
    pool, _, url = await setup(answer_late, response_timeout_s=0.1)
    with pytest.raises(MllpClientError) as info:
        await pool.send(url, order("L1"))
    assert str(info.value) == f"no ACK within 0.1 s from {url.removeprefix('mllp://')}"
    await wait_until(lambda: pool.stats()[url]["late"] == 1)
    stats = pool.stats()[url]
    assert stats["errors"] == 1 and stats["acked"] == 0 and stats["clients"] == 1


# ------------------------------------------------------------------ connection errors


async def test_connect_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = MllpClientPool(connect_timeout_s=2.0)
    url = f"mllp://127.0.0.1:{port}"
    with pytest.raises(MllpClientError) as info:
        await pool.send(url, order("R1"))
    assert str(info.value) == f"connect to 127.0.0.1:{port} refused"
    assert pool.stats()[url]["errors"] == 1
    await pool.close()


async def test_peer_close_fails_pending_send(setup: Setup) -> None:
    pool, _, url = await setup(hang_up)
    with pytest.raises(MllpClientError, match="closed before the ACK"):
        await pool.send(url, order("H1"))
    await wait_until(lambda: pool.stats()[url]["clients"] == 0)


async def test_close_fails_pending_sends(setup: Setup) -> None:
    pool, server, url = await setup(never_answer)
    sending = asyncio.ensure_future(pool.send(url, order("C1")))
    await wait_until(lambda: len(server.received) == 1)
    await pool.close()
    with pytest.raises(MllpClientError):
        await asyncio.wait_for(sending, BOUND_S)
    with pytest.raises(MllpClientError, match="closed"):
        await pool.send(url, order("C2"))


# ------------------------------------------------------------------ pooling


async def test_pool_limit(setup: Setup) -> None:
    pool, server, url = await setup(answer_after_five, max_clients_per_remote=2)
    acks = await asyncio.wait_for(
        asyncio.gather(*(pool.send(url, order(f"P{i}")) for i in range(5))), BOUND_S
    )
    assert [msa_of(a) for a in acks] == [("AA", f"P{i}") for i in range(5)]
    assert server.connections == 2
    assert pool.stats()[url]["clients"] == 2


async def test_concurrent_sends_on_one_connection(setup: Setup) -> None:
    pool, server, url = await setup(answer_in_reverse_after_ten, max_clients_per_remote=1)
    acks = await asyncio.wait_for(
        asyncio.gather(*(pool.send(url, order(f"N{i}")) for i in range(10))), BOUND_S
    )
    assert [msa_of(a)[1] for a in acks] == [f"N{i}" for i in range(10)]
    assert server.connections == 1


async def test_sequential_sends_reuse_a_connection(setup: Setup) -> None:
    pool, server, url = await setup(answer_aa)
    for i in range(5):
        await pool.send(url, order(f"S{i}"))
    assert server.connections == 1


async def test_idle_release_without_keep_alive(setup: Setup) -> None:
    pool, server, url = await setup(answer_aa, idle_release_s=0.0)
    await pool.send(url, order("I1"))
    pool.collect_idle()
    assert pool.stats()[url]["clients"] == 0
    await wait_until(lambda: server.open == 0)
    await pool.send(url, order("I2"))  # a new connection is opened on demand
    assert server.connections == 2


@pytest.mark.parametrize("pool_keep_alive,query", [(True, ""), (False, "keepAlive=true")])
async def test_keep_alive_keeps_connections(setup: Setup, pool_keep_alive: bool, query: str) -> None:
    pool, server, url = await setup(answer_aa, query=query, idle_release_s=0.0, keep_alive=pool_keep_alive)
    await pool.send(url, order("K1"))
    pool.collect_idle()
    assert pool.stats()[url]["clients"] == 1
    await pool.send(url, order("K2"))
    assert server.connections == 1


# ------------------------------------------------------------------ the OutboundSender seam (issue 13)


async def answer_in_cp1252(server: AckServer, frame: bytes, writer: asyncio.StreamWriter) -> None:
    """A windows-1252 device: reads the order as cp1252 and answers with non-ASCII text in cp1252."""
    text = frame.decode("cp1252")  # raises (and the test fails) if it is not cp1252
    control_id = text.split("\r")[0].split("|")[9]
    reply = f"MSH|^~\\&|LIS|LAB|MEDAGENT|CLOUD|20240101||ACK^O01|R{control_id}|P|2.5.1\rMSA|AA|{control_id}|reçu €\r"
    writer.write(encode(reply.encode("cp1252")))


async def test_defect5_push_uses_the_remotes_encoding_both_ways(setup: Setup) -> None:
    """Issue 13 defect 5: mllp://...?encoding=windows-1252 encodes the push and decodes the reply."""
    _, server, url = await setup(answer_in_cp1252, "encoding=windows-1252")
    sender = outbound_sender("mllp")(max_clients_per_remote=2, keep_alive=False)
    assert isinstance(sender, MllpClientPool)
    try:
        body = order("E1").decode().replace("DOE^JANE", "MÜLLER^RENÉ€")
        reply = await asyncio.wait_for(sender.send(url, body, HL7_V2_CONTENT_TYPE, return_ack="first"), BOUND_S)
    finally:
        await sender.close()
    assert server.received == [body.encode("cp1252")]  # € is 0x80 in windows-1252, 3 bytes in UTF-8
    assert isinstance(reply, OutboundReply) and reply.content_type == HL7_V2_CONTENT_TYPE
    assert reply.body.endswith("MSA|AA|E1|reçu €\r")


async def test_reply_with_its_own_msh18_is_decoded_with_it(setup: Setup) -> None:
    async def answer_utf8_declared(server: AckServer, frame: bytes, writer: asyncio.StreamWriter) -> None:
        ack = "MSH|^~\\&|LIS|LAB|ME|CL|2024||ACK|R1|P|2.5.1||||||UNICODE UTF-8\rMSA|AA|U1|Grüße\r"
        writer.write(encode(ack.encode("utf-8")))

    pool, _, url = await setup(answer_utf8_declared, "encoding=latin1")
    reply = await asyncio.wait_for(pool.send(url, order("U1").decode(), HL7_V2_CONTENT_TYPE), BOUND_S)
    assert reply.body.endswith("MSA|AA|U1|Grüße\r")


async def test_unencodable_push_is_refused_without_sending(setup: Setup) -> None:
    pool, server, url = await setup(answer_aa, "encoding=latin1")
    with pytest.raises(MllpClientError, match="cannot be encoded as iso8859-1"):
        await pool.send(url, order("X1").decode().replace("JANE", "李"), HL7_V2_CONTENT_TYPE)
    assert server.connections == 0 and "李" not in str(pool.stats())


async def test_send_timeout_argument_overrides_the_pool_default(setup: Setup) -> None:
    pool, _, url = await setup(never_answer, response_timeout_s=BOUND_S)
    with pytest.raises(MllpClientError, match="no ACK within 0.1 s"):
        await pool.send(url, order("T9").decode(), HL7_V2_CONTENT_TYPE, timeout=0.1)


async def test_deprecated_bytes_form_still_returns_the_raw_ack(setup: Setup) -> None:
    pool, _, url = await setup(answer_ca_then_aa)
    ack = await asyncio.wait_for(pool.send(url, order("B1"), "application"), BOUND_S)  # type: ignore[arg-type]
    assert isinstance(ack, bytes) and msa_of(ack) == ("AA", "B1")
