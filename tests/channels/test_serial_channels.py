"""Serial channels (``astm+serial://``, ``serial://``) on a pseudo-terminal pair (os.openpty).

The test holds the pty master (the instrument's end); the channel opens the slave by path with
pyserial, exactly as it opens /dev/ttyUSB0. A port that vanishes is played by closing the
master (the slave then reads EIO, as with an unplugged USB adapter) and a port that returns by
pointing a symlink (the configured device path) at a new pty.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_astm_peers import (
    ACK,
    ENQ,
    EOT,
    RESULT,
    PtyPeer,
    QueueSink,
    frames,
    queue,  # noqa: F401  (fixture)
    send_session,
    until,
)

from medagent.channels.base import ChannelContext, channel_kind, outbound_sender
from medagent.channels.endpoint import EndpointError, parse_endpoint
from medagent.queue import DurableQueue
from medagent.records import ASTM_CONTENT_TYPE, OCTET_STREAM_CONTENT_TYPE

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")

RESULT_BODY = ("\n".join(RESULT) + "\n").encode()


@pytest.fixture
async def sink(queue: DurableQueue) -> QueueSink:  # noqa: F811
    return QueueSink(queue)


@pytest.fixture
async def pty() -> AsyncIterator[PtyPeer]:
    peer = PtyPeer()
    try:
        yield peer
    finally:
        try:
            peer.close()
        except OSError:
            pass


async def start(url: str, sink: QueueSink, tmp_path: Path) -> Any:
    endpoint = parse_endpoint(url)
    kind = channel_kind(endpoint.scheme)
    channel = kind.create("serial-lab", endpoint, kind.parse_options(endpoint),
                          ChannelContext(sink=sink, data_dir=tmp_path))
    await channel.start()
    return channel


async def test_astm_over_serial_port(pty: PtyPeer, sink: QueueSink, tmp_path: Path) -> None:
    channel = await start(f"astm+serial://{pty.path}?baud=19200&dataBits=8&parity=N&stopBits=1", sink, tmp_path)
    try:
        assert await until(lambda: channel.stats()["serial"]["state"] == "open")
        assert await send_session(pty, RESULT) == ACK * 6
        (row,) = await sink.rows(1)
        assert row.body == RESULT_BODY and row.content_type == ASTM_CONTENT_TYPE and row.remote == pty.path
        stats = channel.stats()
        assert stats["kind"] == "astm+serial" and stats["serial"]["opens"] == 1
    finally:
        await channel.stop()
    assert channel.stats()["serial"]["state"] == "stopped"


async def test_astm_order_to_instrument_over_serial(pty: PtyPeer, sink: QueueSink, tmp_path: Path) -> None:
    channel = await start(f"astm+serial://{pty.path}", sink, tmp_path)
    order = ["H|\\^&|||LIS", "O|1|S0001||^^^GLU|R", "L|1|N"]
    try:
        assert await until(lambda: channel.stats()["serial"]["state"] == "open")
        # a hub push naming the port: the astm+serial outbound sender uses the channel's line
        sender = outbound_sender("astm+serial")()
        send = asyncio.create_task(sender.send(f"astm+serial://{pty.path}", "\n".join(order), ASTM_CONTENT_TYPE))
        assert await pty.read(1) == ENQ
        pty.write(ACK)
        for expected in frames(order):
            assert await pty.read(len(expected)) == expected
            pty.write(ACK)
        assert await pty.read(1) == EOT
        assert (await asyncio.wait_for(send, 5)).status_code == 200
    finally:
        await channel.stop()


async def test_port_disappears_and_returns(sink: QueueSink, tmp_path: Path) -> None:
    device = tmp_path / "ttyUSB0"
    first = PtyPeer()
    os.symlink(first.path, device)
    channel = await start(f"astm+serial://{device}?reopenMinMs=20&reopenMaxMs=100", sink, tmp_path)
    second: PtyPeer | None = None
    try:
        assert await until(lambda: channel.stats()["serial"]["state"] == "open")
        assert await send_session(first, RESULT) == ACK * 6
        first.close()  # unplugged
        assert await until(lambda: channel.stats()["serial"]["losses"] == 1)
        assert channel.stats()["serial"]["state"] == "reopening"
        assert await until(lambda: channel.stats()["serial"]["openFailures"] >= 1)  # still gone
        second = PtyPeer()  # plugged in again (a new tty behind the same path)
        os.unlink(device)
        os.symlink(second.path, device)
        assert await until(lambda: channel.stats()["serial"]["opens"] == 2)
        assert await send_session(second, RESULT[:1] + ["L|1|N"]) == ACK * 3
        rows = await sink.rows(2)
        assert [r.body.count(b"\n") for r in rows] == [5, 2]
    finally:
        await channel.stop()
        if second is not None:
            second.close()


async def test_port_missing_at_start_is_opened_when_it_appears(sink: QueueSink, tmp_path: Path) -> None:
    device = tmp_path / "ttyACM0"
    channel = await start(f"serial://{device}?startChar=%02&endChar=%03&reopenMinMs=20&reopenMaxMs=50",
                          sink, tmp_path)
    peer: PtyPeer | None = None
    try:
        assert channel.stats()["serial"]["state"] == "reopening"
        peer = PtyPeer()
        os.symlink(peer.path, device)
        assert await until(lambda: channel.stats()["serial"]["state"] == "open")
        peer.write(b"noise\x02reading 42\x03")
        (row,) = await sink.rows(1)
        assert row.body == b"\x02reading 42\x03" and row.content_type == OCTET_STREAM_CONTENT_TYPE
    finally:
        await channel.stop()
        if peer is not None:
            peer.close()


async def test_byte_stream_over_serial_with_auto_respond_and_reply(pty: PtyPeer, sink: QueueSink,
                                                                    tmp_path: Path) -> None:
    channel = await start(f"serial://{pty.path}?startChar=%02&endChar=%03&autoRespond=%03:%06"
                          "&bodyEncoding=utf-8", sink, tmp_path)
    try:
        assert await until(lambda: channel.stats()["serial"]["state"] == "open")
        pty.write(b"\x02T=37.2\x03")
        assert await pty.read(1) == ACK
        (row,) = await sink.rows(1)
        assert row.body == b"\x02T=37.2\x03" and channel.encoding == "utf-8"
        assert channel.deliver_reply(pty.path, "", "OK\r")
        assert await pty.read(3) == b"OK\r"
    finally:
        await channel.stop()


@pytest.mark.parametrize(("query", "parameter"), [
    ("baud=fast", "baud"),
    ("baud=10", "baud"),
    ("baud=9600&baudRate=9600", "baudRate"),
    ("dataBits=9", "dataBits"),
    ("parity=X", "parity"),
    ("stopBits=3", "stopBits"),
    ("reopenMinMs=500&reopenMaxMs=100", "reopenMaxMs"),
    ("flowControl=rtscts", "flowControl"),
])
def test_serial_parameters_are_validated(query: str, parameter: str) -> None:
    with pytest.raises(EndpointError) as info:
        parse_endpoint(f"astm+serial:///dev/ttyUSB0?{query}")
    assert info.value.parameter == parameter and "ttyUSB0" in str(info.value)


def test_serial_settings_parsed() -> None:
    endpoint = parse_endpoint("astm+serial:///dev/ttyS1?baudRate=115200&dataBits=7&parity=even&stopBits=2")
    settings = channel_kind("astm+serial").parse_options(endpoint).serial
    assert (settings.device, settings.baud, settings.data_bits, settings.parity, settings.stop_bits) == (
        "/dev/ttyS1", 115200, 7, "E", 2.0)
    with pytest.raises(EndpointError, match="device is missing"):
        parse_endpoint("serial://?startChar=%02&endChar=%03")
