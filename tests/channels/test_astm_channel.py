"""The ``astm://`` channel over real TCP on 127.0.0.1, into a real DurableQueue.

The instrument is a test script speaking E1381 byte by byte (frames built by the standard's
rules in test_astm_peers, not by the core under test). Timers are configured short (tens of
ms) so every timeout case runs without long sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_astm_peers import (
    ACK,
    ENQ,
    EOT,
    NAK,
    RESULT,
    QueueSink,
    TcpPeer,
    frame,
    frames,
    queue,  # noqa: F401  (fixture)
    send_session,
    until,
)

from medagent.channels.astm import AstmChannel, AstmSendError
from medagent.channels.base import ChannelContext, channel_kind, outbound_sender
from medagent.channels.endpoint import EndpointError, parse_endpoint
from medagent.queue import DurableQueue
from medagent.records import ASTM_CONTENT_TYPE

RESULT_BODY = ("\n".join(RESULT) + "\n").encode()


async def start_channel(sink: QueueSink, tmp_path: Path, query: str = "") -> AstmChannel:
    endpoint = parse_endpoint("astm://127.0.0.1:0" + (f"?{query}" if query else ""))
    kind = channel_kind("astm")
    channel = kind.create("lab", endpoint, kind.parse_options(endpoint), ChannelContext(sink=sink, data_dir=tmp_path))
    await channel.start()
    assert isinstance(channel, AstmChannel)
    return channel


@pytest.fixture
async def sink(queue: DurableQueue) -> QueueSink:  # noqa: F811
    return QueueSink(queue)


@pytest.fixture
async def channel(sink: QueueSink, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[AstmChannel]:
    ch = await start_channel(sink, tmp_path, getattr(request, "param", ""))
    try:
        yield ch
    finally:
        await ch.stop(drain_timeout=1.0)


@pytest.fixture
async def peer(channel: AstmChannel) -> AsyncIterator[TcpPeer]:
    p = await TcpPeer.connect(channel.port)
    try:
        yield p
    finally:
        await p.close()


def astm_query(query: str) -> pytest.MarkDecorator:
    """Run the test with the channel built from ``astm://127.0.0.1:0?<query>``."""
    return pytest.mark.parametrize("channel", [query], indirect=True)


# --------------------------------------------------------------------------- receiving


async def test_normal_session_is_stored_and_acked(channel: AstmChannel, peer: TcpPeer, sink: QueueSink) -> None:
    answers = await send_session(peer, RESULT)
    assert answers == ACK * 6
    (row,) = await sink.rows(1)
    assert row.body == RESULT_BODY and row.content_type == ASTM_CONTENT_TYPE
    assert row.channel == "lab" and row.remote.startswith("127.0.0.1:")
    assert row.control_id == "CTL1" and row.message_type == "ASTM^HPORL"
    assert sink.accepted[0].sender == "Analyzer"
    stats = channel.stats()
    assert stats["kind"] == "astm" and stats["unitsIn"] == 1 and stats["answers"] == {"ACK": 1}
    assert stats["connectionsOpen"] == 1 and stats["bytesIn"] > 100


async def test_final_ack_only_after_commit_and_storage_error_naks(
        channel: AstmChannel, peer: TcpPeer, sink: QueueSink, queue: DurableQueue) -> None:  # noqa: F811
    await queue.close()  # every commit now fails with a storage error ("queue closed")
    peer.write(ENQ)
    assert await peer.read(1) == ACK
    sent = frames(RESULT)
    for data in sent[:-1]:
        peer.write(data)
        assert await peer.read(1) == ACK
    peer.write(sent[-1])
    assert await peer.read(1) == NAK  # not stored: the instrument must not believe it was
    assert channel.stats()["answers"] == {"NAK": 1}
    assert channel.stats()["linkEvents"]["commit-failed"] == 1


async def test_checksum_error_naks_then_resend_is_accepted(peer: TcpPeer, sink: QueueSink) -> None:
    peer.write(ENQ)
    assert await peer.read(1) == ACK
    good = frames(RESULT)
    bad = good[0][:-4] + (b"00" if good[0][-4:-2] != b"00" else b"01") + b"\r\n"
    peer.write(bad)
    assert await peer.read(1) == NAK
    for data in good:
        peer.write(data)
        assert await peer.read(1) == ACK
    peer.write(EOT)
    (row,) = await sink.rows(1)
    assert row.body == RESULT_BODY


async def test_repeated_frame_acked_once_stored(peer: TcpPeer, sink: QueueSink) -> None:
    peer.write(ENQ)
    assert await peer.read(1) == ACK
    sent = frames(RESULT)
    for data in [sent[0], sent[1], sent[1], *sent[2:]]:
        peer.write(data)
        assert await peer.read(1) == ACK
    peer.write(EOT)
    (row,) = await sink.rows(1)
    assert row.body.count(b"P|1||PID001") == 1


async def test_resend_after_missed_final_ack_is_not_stored_twice(peer: TcpPeer, sink: QueueSink) -> None:
    assert await send_session(peer, RESULT) == ACK * 6
    assert await send_session(peer, RESULT) == ACK * 6  # the same message again
    assert len(sink.results) == 2 and sink.results[1].dropped  # the queue's DROP dedup
    assert sink.results[1].duplicate_of == sink.results[0].row_id
    assert len(await sink.rows(1)) == 1


async def test_eot_mid_message_stores_nothing(channel: AstmChannel, peer: TcpPeer, sink: QueueSink) -> None:
    peer.write(ENQ)
    assert await peer.read(1) == ACK
    for data in frames(RESULT)[:3]:
        peer.write(data)
        assert await peer.read(1) == ACK
    peer.write(EOT)
    assert await until(lambda: channel.stats()["discardedMessages"] == 1)
    assert sink.accepted == []
    assert await send_session(peer, RESULT) == ACK * 6  # the link is usable again
    assert len(await sink.rows(1)) == 1


async def test_8kb_message_in_etb_frames(peer: TcpPeer, sink: QueueSink) -> None:
    comment = "C|1|I|" + "0123456789" * 850 + "|G"
    data = (comment + "\r").encode()
    pieces = [data[i : i + 240] for i in range(0, len(data), 240)]
    peer.write(ENQ)
    assert await peer.read(1) == ACK
    number = 1
    plan = [frame(1, RESULT[0] + "\r")]
    for index, piece in enumerate(pieces):
        plan.append(frame(2 + index, piece, final=index == len(pieces) - 1))
    plan.append(frame(2 + len(pieces), "L|1|N\r"))
    for number, data_frame in enumerate(plan):
        peer.write(data_frame)
        assert await peer.read(1) == ACK, number
    peer.write(EOT)
    (row,) = await sink.rows(1)
    assert row.body == (RESULT[0] + "\n" + comment + "\nL|1|N\n").encode()
    assert len(row.body) > 8192


async def test_garbage_and_line_noise(channel: AstmChannel, peer: TcpPeer, sink: QueueSink) -> None:
    peer.write(b"\x00\xff\xfe garbage \r\n")
    peer.write(ENQ)
    assert await peer.read(1) == ACK
    for data in frames(RESULT):
        peer.write(b"\x00\x11noise" + data)
        assert await peer.read(1) == ACK
    peer.write(EOT)
    (row,) = await sink.rows(1)
    assert row.body == RESULT_BODY
    assert channel.stats()["noiseBytes"] > 20


async def test_truncated_and_malformed_frames_are_naked(peer: TcpPeer, sink: QueueSink) -> None:
    peer.write(ENQ)
    assert await peer.read(1) == ACK
    first = frames(RESULT)[0]
    peer.write(first[:10] + first)  # a frame cut short by a new STX
    assert await peer.read(2) == NAK + ACK
    peer.write(frame(2, "P|1\r")[:-2] + b"??")  # bad trailer
    assert await peer.read(1) == NAK


@astm_query("maxFrameSize=64")
async def test_oversize_frame_naked(peer: TcpPeer) -> None:
    peer.write(ENQ)
    assert await peer.read(1) == ACK
    peer.write(frame(1, "R|" + "9" * 500 + "\r"))
    assert await peer.read(1) == NAK


async def test_two_instruments_at_once(channel: AstmChannel, sink: QueueSink) -> None:
    a, b = await TcpPeer.connect(channel.port), await TcpPeer.connect(channel.port)
    try:
        results = await asyncio.gather(send_session(a, RESULT), send_session(b, RESULT[:2] + ["L|1|N"]))
        assert results == [ACK * 6, ACK * 4]
        rows = await sink.rows(2)
        assert len(rows) == 2 and rows[0].remote != rows[1].remote
    finally:
        await a.close()
        await b.close()


# --------------------------------------------------------------------------- timers


@astm_query("frameTimeoutMs=100")
async def test_receiver_frame_timeout_discards_partial_message(channel: AstmChannel, peer: TcpPeer,
                                                              sink: QueueSink) -> None:
    peer.write(ENQ)
    assert await peer.read(1) == ACK
    peer.write(frames(RESULT)[0])
    assert await peer.read(1) == ACK
    assert await until(lambda: channel.stats()["linkEvents"].get("timeout") == 1)
    assert channel.stats()["discardedMessages"] == 1
    # after the timeout the link is neutral: a frame without ENQ is line noise, not answered
    peer.write(frames(RESULT)[1])
    assert await peer.silent(0.2)
    assert sink.accepted == []


# --------------------------------------------------------------------------- outbound


ORDER = ["H|\\^&|||LIS", "P|1||PID001", "O|1|S0001||^^^GLU|R", "L|1|N"]


async def instrument_receives(peer: TcpPeer, count: int, answer: bytes = ACK) -> list[bytes]:
    """Answer ENQ and `count` frames; return the frames (then expect EOT)."""
    assert await peer.read(1) == ENQ
    peer.write(ACK)
    got = []
    for _ in range(count):
        head = await peer.read(2)
        rest = b""
        while not rest.endswith(b"\r\n"):
            rest += await peer.read(1)
        got.append(head + rest)
        peer.write(answer)
    return got


async def test_outbound_order_reaches_instrument_in_order(channel: AstmChannel, peer: TcpPeer) -> None:
    assert await until(lambda: len(channel.sessions) == 1)
    remote = next(iter(channel.sessions))
    send = asyncio.create_task(channel.send_to(remote, "\n".join(ORDER)))
    got = await instrument_receives(peer, len(ORDER))
    assert got == frames(ORDER)
    assert await peer.read(1) == EOT
    reply = await asyncio.wait_for(send, 5)
    assert reply.status_code == 200 and channel.stats()["unitsOut"] == 1


@astm_query("contentionRetryMs=200")
async def test_contention_instrument_wins_then_order_is_sent(channel: AstmChannel, peer: TcpPeer,
                                                             sink: QueueSink) -> None:
    assert await until(lambda: len(channel.sessions) == 1)
    send = asyncio.create_task(channel.send_to("", "\n".join(ORDER)))
    assert await peer.read(1) == ENQ
    peer.write(ENQ)  # our ENQ crossed the host's: contention; the host must yield (no answer)
    assert await peer.silent(0.05)
    answers = await send_session(peer, RESULT)  # the instrument (1 s rule aside) sends first
    assert answers == ACK * 6
    got = await instrument_receives(peer, len(ORDER))  # then the host retries after 200 ms
    assert got == frames(ORDER) and await peer.read(1) == EOT
    await asyncio.wait_for(send, 5)
    assert len(await sink.rows(1)) == 1
    assert channel.stats()["linkEvents"]["contention"] == 1


async def test_outbound_nak_six_times_fails(channel: AstmChannel, peer: TcpPeer) -> None:
    assert await until(lambda: len(channel.sessions) == 1)
    send = asyncio.create_task(channel.send_to("", "\n".join(ORDER)))
    assert await peer.read(1) == ENQ
    peer.write(ACK)
    first = frames(ORDER)[0]
    for _ in range(6):
        assert await peer.read(len(first)) == first
        peer.write(NAK)
    assert await peer.read(1) == EOT
    with pytest.raises(AstmSendError, match="not accepted after 6 attempts"):
        await asyncio.wait_for(send, 5)


@astm_query("establishmentTimeoutMs=50&busyRetryMs=50&maxAttempts=2")
async def test_outbound_establishment_timeout_and_busy(channel: AstmChannel, peer: TcpPeer) -> None:
    assert await until(lambda: len(channel.sessions) == 1)
    send = asyncio.create_task(channel.send_to("", "\n".join(ORDER)))
    assert await peer.read(1) == ENQ
    peer.write(NAK)  # busy
    assert await peer.read(1) == ENQ  # retried after busyRetryMs
    # no answer: the establishment timer ends the attempt with EOT; 2 attempts -> failure
    assert await peer.read(1) == EOT
    with pytest.raises(AstmSendError, match="gave up after 2 attempts"):
        await asyncio.wait_for(send, 5)


@astm_query("replyTimeoutMs=80")
async def test_outbound_frame_reply_timeout_aborts(channel: AstmChannel, peer: TcpPeer) -> None:
    assert await until(lambda: len(channel.sessions) == 1)
    send = asyncio.create_task(channel.send_to("", "\n".join(ORDER)))
    assert await peer.read(1) == ENQ
    peer.write(ACK)
    first = frames(ORDER)[0]
    assert await peer.read(len(first)) == first
    assert await peer.read(1) == EOT  # no answer within 80 ms
    with pytest.raises(AstmSendError, match="no answer to frame"):
        await asyncio.wait_for(send, 5)


async def test_outbound_to_unknown_instrument_fails(channel: AstmChannel) -> None:
    with pytest.raises(AstmSendError, match="no instrument connected"):
        await channel.send_to("10.0.0.1:9", "L|1")


async def test_outbound_connection_lost_fails(channel: AstmChannel, peer: TcpPeer) -> None:
    assert await until(lambda: len(channel.sessions) == 1)
    send = asyncio.create_task(channel.send_to("", "\n".join(ORDER)))
    assert await peer.read(1) == ENQ
    await peer.close()
    with pytest.raises(AstmSendError, match="connection lost"):
        await asyncio.wait_for(send, 5)


async def test_outbound_sender_connects_to_a_listening_instrument() -> None:
    received: list[bytes] = []

    async def instrument(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(1) == ENQ
        writer.write(ACK)
        for _ in range(len(ORDER)):
            received.append(await reader.readuntil(b"\r\n"))
            writer.write(ACK)
        assert await reader.readexactly(1) == EOT
        writer.close()

    server = await asyncio.start_server(instrument, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = outbound_sender("astm")()
    try:
        reply = await sender.send(f"astm://127.0.0.1:{port}", "\r\n".join(ORDER), ASTM_CONTENT_TYPE, timeout=5)
        assert reply.status_code == 200 and received == frames(ORDER)
        with pytest.raises(AstmSendError, match="not an astm://"):
            await sender.send("mllp://127.0.0.1:1", "L|1", ASTM_CONTENT_TYPE)
        with pytest.raises(AstmSendError, match="unknown parameter 'baud'"):
            await sender.send(f"astm://127.0.0.1:{port}?baud=1", "L|1", ASTM_CONTENT_TYPE)
        with pytest.raises(AstmSendError, match="cannot be encoded as ascii"):
            await sender.send(f"astm://127.0.0.1:{port}?encoding=ascii", "P|1||Müller", ASTM_CONTENT_TYPE)
    finally:
        await sender.close()
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- config


def test_endpoint_parameters_are_validated() -> None:
    with pytest.raises(EndpointError, match="'replyTimeoutMs'"):
        parse_endpoint("astm://127.0.0.1:0?replyTimeoutMs=soon")
    with pytest.raises(EndpointError, match="unknown parameter"):
        parse_endpoint("astm://127.0.0.1:0?startChar=%05")
    with pytest.raises(EndpointError, match="'encoding'"):
        parse_endpoint("astm://127.0.0.1:0?encoding=utf-16")
    options = channel_kind("astm").parse_options(parse_endpoint("astm://127.0.0.1:0?frameTimeoutMs=500"))
    assert options.timers.frame == 0.5 and options.timers.reply == 15.0


async def test_stop_closes_connections_and_listener(sink: QueueSink, tmp_path: Path) -> None:
    ch = await start_channel(sink, tmp_path)
    p = await TcpPeer.connect(ch.port)
    assert await until(lambda: len(ch.sessions) == 1)
    await ch.stop(drain_timeout=0.5)
    assert ch.sessions == {} and ch.listening_sockets() == []
    assert await asyncio.wait_for(p.reader.read(1), 2) == b""  # closed by the channel
    await p.close()


async def test_hub_push_reaches_connected_instrument_through_the_outbound_sender(
        channel: AstmChannel, peer: TcpPeer) -> None:
    assert await until(lambda: len(channel.sessions) == 1)
    remote = next(iter(channel.sessions))  # what the instrument's own transmits carry as remote
    sender = outbound_sender("astm")()
    push = asyncio.create_task(sender.send(f"astm://{remote}", "\n".join(ORDER), ASTM_CONTENT_TYPE, timeout=5))
    got = await instrument_receives(peer, len(ORDER))
    assert got == frames(ORDER) and await peer.read(1) == EOT
    assert (await asyncio.wait_for(push, 5)).body == "ACK"
    with pytest.raises(AstmSendError, match="no running astm\\+serial channel"):
        await outbound_sender("astm+serial")().send("astm+serial:///dev/nonexistent", "L|1", ASTM_CONTENT_TYPE)


async def test_start_on_a_handed_over_socket(sink: QueueSink, tmp_path: Path) -> None:
    """An upgrade or reload hands the listening socket over: the channel serves on it."""
    import socket as socketlib

    listener = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    endpoint = parse_endpoint(f"astm://127.0.0.1:{port}")
    kind = channel_kind("astm")
    ch = kind.create("lab", endpoint, kind.parse_options(endpoint), ChannelContext(sink=sink, data_dir=tmp_path))
    await ch.start(listener)
    try:
        assert [s.getsockname()[1] for s in ch.listening_sockets()] == [port]
        p = await TcpPeer.connect(port)
        assert await send_session(p, RESULT) == ACK * 6
        await p.close()
    finally:
        await ch.stop(drain_timeout=0.5)


async def test_pause_and_resume_reading(channel: AstmChannel, peer: TcpPeer, sink: QueueSink) -> None:
    assert await until(lambda: len(channel.sessions) == 1)
    channel.pause_reading()  # runtime backpressure
    peer.write(ENQ)
    assert await peer.silent(0.1)  # not read, so not answered
    channel.resume_reading()
    assert await peer.read(1) == ACK


async def test_lab_channels_implement_the_channel_protocol(sink: QueueSink, tmp_path: Path) -> None:
    from medagent.channels.base import Channel, known_schemes

    for url in ("astm://127.0.0.1:0", "astm+serial:///dev/ttyUSB9", "tcp://127.0.0.1:0?startChar=%02&endChar=%03",
                "serial:///dev/ttyUSB9?startChar=%02&endChar=%03"):
        endpoint = parse_endpoint(url)
        kind = channel_kind(endpoint.scheme)
        built = kind.create("c", endpoint, kind.parse_options(endpoint), ChannelContext(sink=sink, data_dir=tmp_path))
        assert isinstance(built, Channel) and built.kind == endpoint.scheme
        assert kind.needs_port is (endpoint.scheme in ("astm", "tcp"))
        assert endpoint.scheme in known_schemes()


async def test_two_orders_reach_the_instrument_in_push_order(channel: AstmChannel, peer: TcpPeer) -> None:
    assert await until(lambda: len(channel.sessions) == 1)
    first = ORDER
    second = ["H|\\^&|||LIS", "P|2||PID002", "O|1|S0002||^^^NA|R", "L|1|N"]
    sends = [asyncio.create_task(channel.send_to("", "\n".join(first))),
             asyncio.create_task(channel.send_to("", "\n".join(second)))]
    got_first = await instrument_receives(peer, len(first))
    assert await peer.read(1) == EOT
    got_second = await instrument_receives(peer, len(second))  # a new session: ENQ, frames 1..4
    assert await peer.read(1) == EOT
    assert (got_first, got_second) == (frames(first), frames(second))
    assert [r.status_code for r in await asyncio.gather(*sends)] == [200, 200]


async def test_order_waits_for_the_instruments_transmission(channel: AstmChannel, peer: TcpPeer,
                                                            sink: QueueSink) -> None:
    """A push during the instrument's session: the host stays receiver until EOT (LIS01-A2 §6.2)."""
    peer.write(ENQ)
    assert await peer.read(1) == ACK
    send = asyncio.create_task(channel.send_to("", "\n".join(ORDER)))
    for data in frames(RESULT):
        peer.write(data)
        assert await peer.read(1) == ACK  # answers only; no ENQ in the middle of the session
    peer.write(EOT)
    got = await instrument_receives(peer, len(ORDER))  # then the host's own session
    assert got == frames(ORDER) and await peer.read(1) == EOT
    await asyncio.wait_for(send, 5)
    assert len(await sink.rows(1)) == 1


@astm_query("sendTimeoutMs=150")
async def test_send_timeout_withdraws_the_message(channel: AstmChannel, peer: TcpPeer) -> None:
    assert await until(lambda: len(channel.sessions) == 1)
    send = asyncio.create_task(channel.send_to("", "\n".join(ORDER)))
    assert await peer.read(1) == ENQ
    peer.write(ACK)
    first = frames(ORDER)[0]
    assert await peer.read(len(first)) == first  # the instrument then stays silent
    with pytest.raises(AstmSendError, match="not sent within"):
        await asyncio.wait_for(send, 5)
    assert await peer.read(1) == EOT  # aborted on the line: it will never arrive later
