"""The ``tcp://`` byte-stream channel over real TCP on 127.0.0.1, into a real DurableQueue.

One case per Medplum parameter (bytestream.ts, newest), the documented ASTM workaround URL as
Medplum's docs give it, and medagent's frame cap.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_astm_peers import ACK, RESULT, QueueSink, TcpPeer, frames, queue, until  # noqa: F401

from medagent.channels.base import ChannelContext, channel_kind
from medagent.channels.bytestream import ByteStreamChannel
from medagent.channels.endpoint import EndpointError, parse_endpoint
from medagent.queue import DurableQueue
from medagent.records import OCTET_STREAM_CONTENT_TYPE

MEDPLUM_ASTM = ("startChar=%05&endChar=%04&autoRespond=%05:%06,%03:%06,%17:%06&stripControlChars=true"
                "&keepControlChars=%0D%0A&bodyEncoding=utf-8&ignoreResponse=true")


@pytest.fixture
async def sink(queue: DurableQueue) -> QueueSink:  # noqa: F811
    return QueueSink(queue)


@pytest.fixture
async def channel(sink: QueueSink, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[ByteStreamChannel]:
    endpoint = parse_endpoint(f"tcp://127.0.0.1:0?{request.param}")
    kind = channel_kind("tcp")
    ch = kind.create("bytes", endpoint, kind.parse_options(endpoint), ChannelContext(sink=sink, data_dir=tmp_path))
    await ch.start()
    try:
        yield ch
    finally:
        await ch.stop()


def query(q: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("channel", [q], indirect=True)


async def bodies(sink: QueueSink, count: int) -> list[bytes]:
    rows = await sink.rows(count)
    assert all(r.content_type == OCTET_STREAM_CONTENT_TYPE for r in rows)
    return [r.body for r in rows]


@query("startChar=%02&endChar=%03")
async def test_start_end_framing_drops_bytes_outside_frames(channel: ByteStreamChannel, sink: QueueSink) -> None:
    peer = await TcpPeer.connect(channel.port)
    try:
        peer.write(b"junk\x02first\x03between\x02sec")
        peer.write(b"ond\x03\x03tail")
        assert await bodies(sink, 2) == [b"\x02first\x03", b"\x02second\x03"]
        assert channel.encoding == "hex"  # Medplum's default: the transmit body is hex
        assert await until(lambda: channel.stats()["discardedBytes"] == len(b"junkbetween\x03tail"))
        stats = channel.stats()
        assert stats["kind"] == "tcp" and stats["unitsIn"] == 2 and stats["connectionsOpen"] == 1
    finally:
        await peer.close()


@query(MEDPLUM_ASTM)
async def test_medplum_documented_astm_configuration(channel: ByteStreamChannel, sink: QueueSink) -> None:
    """Medplum's agent/astm-channels.md URL: one ENQ..EOT session = one unit, ACK on ENQ/ETX/ETB."""
    peer = await TcpPeer.connect(channel.port)
    try:
        peer.write(b"\x05")
        assert await peer.read(1) == ACK  # ENQ
        sent = frames(RESULT)
        for data in sent:
            peer.write(data)
            assert await peer.read(1) == ACK  # ETX
        peer.write(b"\x04")
        (body,) = await bodies(sink, 1)
        # Medplum keeps frame numbers and checksum digits; strips STX/ETX/ENQ/EOT; keeps CR LF.
        expected = b"".join(f[1:-5] + f[-4:-2] + b"\r\n" for f in sent)
        assert body == expected
        assert body.startswith(b"1H|\\^&|CTL1") and channel.encoding == "utf-8"
        assert not channel.wants_replies  # ignoreResponse=true
        assert channel.stats()["answers"] == {"autoRespond": 6}
    finally:
        await peer.close()


@query("startChar=%02&endChar=%03&autoRespond=ab:XY,%02:S")
async def test_auto_respond_multi_byte_and_at_start_char(channel: ByteStreamChannel, sink: QueueSink) -> None:
    peer = await TcpPeer.connect(channel.port)
    try:
        peer.write(b"a")
        peer.write(b"b")  # the pattern completes across reads
        assert await peer.read(2) == b"XY"
        peer.write(b"\x02data\x03")
        assert await peer.read(1) == b"S"
        assert await bodies(sink, 1) == [b"\x02data\x03"]
    finally:
        await peer.close()


@query("startChar=%02&endChar=%03&stripSequence=%0D%0A,%0D")
async def test_strip_sequence(channel: ByteStreamChannel, sink: QueueSink) -> None:
    peer = await TcpPeer.connect(channel.port)
    try:
        peer.write(b"\x02a\r\nb\rc\x03")
        assert await bodies(sink, 1) == [b"\x02abc\x03"]
    finally:
        await peer.close()


@query("startChar=%02&endChar=%03&stripControlChars=true")
async def test_strip_control_chars_drops_framing_too(channel: ByteStreamChannel, sink: QueueSink) -> None:
    peer = await TcpPeer.connect(channel.port)
    try:
        peer.write(b"\x02a\x00b\r\n\x1fc\x03")
        assert await bodies(sink, 1) == [b"abc"]
    finally:
        await peer.close()


@query("startChar=%02&endChar=%03&stripControlChars=true&keepControlChars=%0D,%0A")
async def test_keep_control_chars(channel: ByteStreamChannel, sink: QueueSink) -> None:
    peer = await TcpPeer.connect(channel.port)
    try:
        peer.write(b"\x02R|1\r\n\x00R|2\r\x03")
        assert await bodies(sink, 1) == [b"R|1\r\nR|2\r"]
    finally:
        await peer.close()


@query("startChar=%02&endChar=%03")
async def test_reply_hex_is_written_back_to_the_connection(channel: ByteStreamChannel, sink: QueueSink) -> None:
    peer = await TcpPeer.connect(channel.port)
    try:
        peer.write(b"\x02q\x03")
        (row,) = await sink.rows(1)
        assert channel.wants_replies
        assert channel.deliver_reply(row.remote, "", "06414243")
        assert await peer.read(4) == b"\x06ABC"
        assert not channel.deliver_reply(row.remote, "", "not hex")
        assert not channel.deliver_reply("127.0.0.1:1", "", "06")  # no such connection
        assert channel.stats()["repliesDropped"] == 2
    finally:
        await peer.close()


@query("startChar=%02&endChar=%03&bodyEncoding=utf-8")
async def test_reply_utf8(channel: ByteStreamChannel, sink: QueueSink) -> None:
    peer = await TcpPeer.connect(channel.port)
    try:
        peer.write("\x02é\x03".encode())
        (row,) = await sink.rows(1)
        assert row.body == "\x02é\x03".encode() and channel.encoding == "utf-8"
        assert channel.deliver_reply(row.remote, "", "ok é")
        assert await peer.read(5) == "ok é".encode()
    finally:
        await peer.close()


@query("startChar=%02&endChar=%03&maxFrameSize=16")
async def test_max_frame_size_drops_oversize_and_resyncs(channel: ByteStreamChannel, sink: QueueSink) -> None:
    peer = await TcpPeer.connect(channel.port)
    try:
        peer.write(b"\x02" + b"x" * 100 + b"\x03\x02small\x03")
        assert await bodies(sink, 1) == [b"\x02small\x03"]
        assert channel.stats()["framesTooLarge"] == 1 and channel.stats()["errors"] == 1
    finally:
        await peer.close()


@query("startChar=%02&endChar=%03&maxConnections=1")
async def test_max_connections(channel: ByteStreamChannel, sink: QueueSink) -> None:
    first = await TcpPeer.connect(channel.port)
    second = await TcpPeer.connect(channel.port)
    try:
        assert await asyncio.wait_for(second.reader.read(1), 5) == b""  # refused: closed at once
        first.write(b"\x02ok\x03")
        assert await bodies(sink, 1) == [b"\x02ok\x03"]
    finally:
        await first.close()
        await second.close()


@query("startChar=%02&endChar=%03&autoRespond=%03:%06")
async def test_connections_are_framed_independently(channel: ByteStreamChannel, sink: QueueSink) -> None:
    a, b = await TcpPeer.connect(channel.port), await TcpPeer.connect(channel.port)
    try:
        a.write(b"\x02from-a ")
        b.write(b"\x02from-b\x03")
        assert await b.read(1) == ACK
        a.write(b"done\x03")
        assert await a.read(1) == ACK
        rows = await sink.rows(2)
        assert sorted(r.body for r in rows) == [b"\x02from-a done\x03", b"\x02from-b\x03"]
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(("url_query", "parameter"), [
    ("endChar=%03", "startChar"),
    ("startChar=%02", "endChar"),
    ("startChar=%02%03&endChar=%03", "startChar"),
    ("startChar=%02&endChar=%02", "endChar"),
    ("startChar=%02&endChar=%03&autoRespond=%05", "autoRespond"),
    ("startChar=%02&endChar=%03&autoRespond=%05:%06,%05:%15", "autoRespond"),
    ("startChar=%02&endChar=%03&autoRespond=:%06", "autoRespond"),
    ("startChar=%02&endChar=%03&stripSequence=%E2%82%AC", "stripSequence"),
    ("startChar=%02&endChar=%03&bodyEncoding=base64", "bodyEncoding"),
    ("startChar=%02&endChar=%03&stripControlChars=yes", "stripControlChars"),
    ("startChar=%02&endChar=%03&maxFrameSize=0", "maxFrameSize"),
    ("startChar=%02&endChar=%03&autoRespond2=%05:%06", "autoRespond2"),
    ("startChar=%02&endChar=%03&keepControlChars=%0D&keepControlChars=%0A", "keepControlChars"),
])
def test_parameters_are_validated(url_query: str, parameter: str) -> None:
    with pytest.raises(EndpointError) as info:
        parse_endpoint(f"tcp://127.0.0.1:0?{url_query}")
    assert info.value.parameter == parameter


def test_medplum_options_parse() -> None:
    options = channel_kind("tcp").parse_options(parse_endpoint(f"tcp://0.0.0.0:9000?{MEDPLUM_ASTM}"))
    framing = options.framing
    assert (framing.start_byte, framing.end_byte) == (5, 4)
    assert [(r.pattern, r.response) for r in framing.auto_respond] == [(b"\x05", b"\x06"), (b"\x03", b"\x06"),
                                                                        (b"\x17", b"\x06")]
    assert framing.strip_control_chars and framing.keep_control_chars == {0x0D, 0x0A}
    assert options.body_encoding.value == "utf-8" and options.ignore_response
    utf8_byte = channel_kind("tcp").parse_options(parse_endpoint("tcp://h:1?startChar=%C3%A9&endChar=%03"))
    assert utf8_byte.framing.start_byte == 0xE9  # bytes >= 0x80 are written UTF-8-encoded
