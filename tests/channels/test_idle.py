"""Defect 3 (issue 18): idle connections must not lock out real senders.

Real MLLP channel on 127.0.0.1 with a real DurableQueue; clients are plain asyncio sockets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from medagent.channels.endpoint import mllp_options, parse_endpoint
from medagent.channels.hl7 import Hl7Channel
from medagent.proto.mllp import MllpDecoderPy, encode
from medagent.queue.durable import DurableQueue
from medagent.queue.records import CommitResult, DuplicatePolicy, InboundRecord

BOUND_S = 10.0


def msg(control_id: str) -> bytes:
    return (f"MSH|^~\\&|LAB|HOSP|MEDAGENT|CLOUD|20240101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r"
            "PID|1||12345||DOE^JOHN\r").encode()


class Sink:
    def __init__(self, queue: DurableQueue) -> None:
        self.queue = queue

    def accept(self, record: InboundRecord, *, durable: bool, dedup: DuplicatePolicy,
               on_commit: Callable[[CommitResult], None] | None) -> None:
        if durable:
            assert on_commit is not None
            self.queue.submit(record, on_commit, dedup)


@pytest.fixture
async def channel_factory(tmp_path: Path) -> AsyncIterator[Callable[[str], object]]:
    queue = DurableQueue(tmp_path / "queue.db")
    await queue.open()
    channels: list[Hl7Channel] = []

    async def make(params: str) -> Hl7Channel:
        endpoint = parse_endpoint(f"mllp://127.0.0.1:0?{params}")
        channel = Hl7Channel("adt-in", endpoint, mllp_options(endpoint), Sink(queue))
        await channel.start()
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        await channel.stop(drain_timeout=1.0)
    await queue.close()


@pytest.fixture
async def clients() -> AsyncIterator[list[asyncio.StreamWriter]]:
    writers: list[asyncio.StreamWriter] = []
    yield writers
    for writer in writers:
        writer.close()
    for writer in writers:
        try:
            await asyncio.wait_for(writer.wait_closed(), BOUND_S)
        except (ConnectionError, OSError, TimeoutError):
            pass


async def open_client(channel: Hl7Channel, writers: list[asyncio.StreamWriter]
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", channel.port), BOUND_S)
    writers.append(writer)
    return reader, writer


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, control_id: str) -> bytes:
    writer.write(encode(msg(control_id)))
    await writer.drain()
    decoder = MllpDecoderPy()
    async with asyncio.timeout(BOUND_S):
        while True:
            data = await reader.read(65536)
            assert data, f"connection closed before the ACK of {control_id}"
            frames = decoder.feed(data)
            if frames:
                return frames[0]


async def closed(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(BOUND_S):
        while True:
            try:
                if not await reader.read(65536):
                    return True
            except ConnectionError:
                return True


async def wait_until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(BOUND_S):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_hundred_idle_connections_do_not_lock_out_a_sender(channel_factory, clients, caplog) -> None:
    """The defect: 100 idle sockets (the default maxConnections) used to refuse every sender."""
    channel = await channel_factory("ackMode=fast")
    assert channel.options.max_connections == 100
    veteran = await open_client(channel, clients)  # the oldest connection, but it has traffic
    assert b"MSA|AA|V1" in await exchange(*veteran, "V1")
    idle = [await open_client(channel, clients) for _ in range(99)]
    await wait_until(lambda: channel.stats()["connections_open"] == 100)
    caplog.set_level(logging.INFO, logger="medagent.channels.listener")
    for number in range(3):
        sender = await open_client(channel, clients)
        assert b"MSA|AA|S%d" % number in await exchange(*sender, f"S{number}")
    assert channel.stats()["connections_evicted"] == 3
    assert channel.stats()["connections_open"] == 100
    # the three longest-idle ones went, in order; the veteran stays and still works
    for reader, _ in idle[:3]:
        assert await closed(reader)
    assert b"MSA|AA|V2" in await exchange(*veteran, "V2")
    eviction_lines = [r for r in caplog.records if "never sent a message" in r.getMessage()]
    assert len(eviction_lines) == 1  # once per episode, not per connection


async def test_sender_awaiting_its_ack_is_never_evicted(channel_factory, clients) -> None:
    channel = await channel_factory("ackMode=original&maxConnections=1&responseTimeoutMs=60000")
    _, writer = await open_client(channel, clients)
    writer.write(encode(msg("W1")))  # the hub reply never comes in this test: the ACK stays owed
    await writer.drain()
    await wait_until(lambda: channel.stats()["acks_pending"] == 1)
    newcomer, _ = await open_client(channel, clients)
    assert await closed(newcomer)
    assert channel.stats()["connections_evicted"] == 0
    assert channel.stats()["connections_refused"] == 1
    host, port = writer.get_extra_info("sockname")[:2]
    remote = f"{host}:{port}"
    ack = "MSH|^~\\&|MEDAGENT|CLOUD|LAB|HOSP|20240101120000||ACK|X|P|2.5.1\rMSA|AA|W1\r"
    assert channel.deliver_reply(remote, "W1", ack)


async def test_partial_frame_is_traffic(channel_factory, clients) -> None:
    channel = await channel_factory("ackMode=fast&maxConnections=1")
    reader, writer = await open_client(channel, clients)
    writer.write(encode(msg("P1"))[:20])  # a message under way
    await writer.drain()
    await wait_until(lambda: channel.stats()["bytes_received"] >= 20)
    newcomer, _ = await open_client(channel, clients)
    assert await closed(newcomer)
    writer.write(encode(msg("P1"))[20:])
    decoder = MllpDecoderPy()
    async with asyncio.timeout(BOUND_S):
        frames: list[bytes] = []
        while not frames:
            data = await reader.read(65536)
            assert data
            frames = decoder.feed(data)
    assert b"MSA|AA|P1" in frames[0]


async def test_silent_connection_closed_after_first_message_timeout(channel_factory, clients) -> None:
    channel = await channel_factory("ackMode=fast&firstMessageTimeoutMs=50")
    silent, _ = await open_client(channel, clients)
    talker = await open_client(channel, clients)
    assert b"MSA|AA|T1" in await exchange(*talker, "T1")
    assert await closed(silent)
    assert channel.stats()["connections_silent_closed"] == 1
    await asyncio.sleep(0.1)  # past the timeout: the sender with traffic is kept
    assert b"MSA|AA|T2" in await exchange(*talker, "T2")


async def test_per_address_limit(channel_factory, clients) -> None:
    channel = await channel_factory("ackMode=fast&maxConnectionsPerAddress=2")
    first, second = await open_client(channel, clients), await open_client(channel, clients)
    await wait_until(lambda: channel.stats()["connections_open"] == 2)
    third, _ = await open_client(channel, clients)
    assert await closed(third)
    assert b"MSA|AA|A1" in await exchange(*first, "A1")
    assert b"MSA|AA|A2" in await exchange(*second, "A2")


def test_parameters_are_checked() -> None:
    from medagent.channels.endpoint import EndpointError

    options = mllp_options(parse_endpoint("mllp://127.0.0.1:0"))
    assert options.first_message_timeout_s == 30.0 and options.max_connections_per_address == 0
    with pytest.raises(EndpointError, match="firstMessageTimeoutMs"):
        parse_endpoint("mllp://127.0.0.1:0?firstMessageTimeoutMs=-1")
