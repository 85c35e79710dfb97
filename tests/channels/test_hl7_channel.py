"""The inbound MLLP channel over real sockets on 127.0.0.1, with a real DurableQueue.

`QueueSink` stands in for the agent runtime: it submits durable records to a real DurableQueue
(tmp_path) and records immediate ones; reply cases call `channel.deliver_reply` as the runtime
does on `agent:transmit:response`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from medagent.channels.base import Channel, ChannelContext, channel_kind
from medagent.channels.endpoint import mllp_options, parse_endpoint
from medagent.channels.hl7 import MAX_CONSECUTIVE_FRAMING_ERRORS, Hl7Channel
from medagent.proto import hl7 as hl7proto
from medagent.proto.mllp import MllpDecoderPy, encode
from medagent.queue.durable import DurableQueue
from medagent.queue.records import CommitResult, DuplicatePolicy, InboundRecord, QueuedMessage

BOUND_S = 5.0  # every wait in this file is bounded by this


# ------------------------------------------------------------------ helpers


def message(
    control_id: str,
    *,
    msh15: str = "",
    msh16: str = "",
    charset: str = "",
    pid_name: str = "DOE^JOHN",
    trailer: str = "",
) -> str:
    msh = f"MSH|^~\\&|LAB|HOSP|MEDAGENT|CLOUD|20240101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1||"
    msh += f"|{msh15}|{msh16}||{charset}"
    return f"{msh}\rEVN|A01|20240101120000\rPID|1||12345||{pid_name}{trailer}\r"


def msg(control_id: str, **kwargs: str) -> bytes:
    return message(control_id, **kwargs).encode("latin-1")


def msa(ack: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, MSA-3) of an ACK."""
    try:
        text = hl7proto.decode(ack, "latin-1")
    except hl7proto.Hl7Error:  # an ACK keeps the message's MSH-18, even an unknown one
        text = ack.decode("latin-1")
    for segment in text.split("\r"):
        if segment.startswith("MSA|"):
            fields = segment.split("|") + ["", "", ""]
            return fields[1], fields[2], fields[3]
    raise AssertionError("no MSA segment in the ACK")


class QueueSink:
    """The test's runtime stand-in: durable records go to the real queue."""

    def __init__(self, queue: DurableQueue | None) -> None:
        self.queue = queue
        self.accepted: list[InboundRecord] = []
        self.immediate: list[InboundRecord] = []
        self.policies: list[DuplicatePolicy] = []

    def accept(self, record: InboundRecord, *, durable: bool, dedup: DuplicatePolicy,
               on_commit: Callable[[CommitResult], None] | None) -> None:
        self.accepted.append(record)
        self.policies.append(dedup)
        if durable:
            assert self.queue is not None and on_commit is not None
            self.queue.submit(record, on_commit, dedup)
        else:
            assert on_commit is None
            self.immediate.append(record)


class FailingSink(QueueSink):
    """Reports a storage failure for every durable record (the queue's documented result)."""

    def accept(self, record: InboundRecord, *, durable: bool, dedup: DuplicatePolicy,
               on_commit: Callable[[CommitResult], None] | None) -> None:
        self.accepted.append(record)
        assert on_commit is not None
        result = CommitResult(None, None, "storage error: database or disk is full")
        asyncio.get_running_loop().call_soon(on_commit, result)


class Client:
    """A device: writes frames, reads ACK frames (bounded)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = MllpDecoderPy()
        self.frames: list[bytes] = []

    @property
    def local(self) -> str:
        host, port = self.writer.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    async def send(self, *payloads: bytes, raw: bytes = b"") -> None:
        self.writer.write(raw + b"".join(encode(p) for p in payloads))
        await self.writer.drain()

    async def acks(self, count: int) -> list[bytes]:
        async with asyncio.timeout(BOUND_S):
            while len(self.frames) < count:
                data = await self.reader.read(65536)
                if not data:
                    raise AssertionError(f"connection closed after {len(self.frames)} of {count} ACKs")
                self.frames += self.decoder.feed(data)
        taken, self.frames = self.frames[:count], self.frames[count:]
        return taken

    async def ack(self) -> bytes:
        return (await self.acks(1))[0]

    async def closed_by_peer(self) -> bool:
        async with asyncio.timeout(BOUND_S):
            while True:
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:
                    return True
                if not data:
                    return True
                self.frames += self.decoder.feed(data)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def wait_until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(BOUND_S):
        while not predicate():
            await asyncio.sleep(0.005)


async def stored(queue: DurableQueue, count: int) -> list[QueuedMessage]:
    rows: list[QueuedMessage] = []
    async with asyncio.timeout(BOUND_S):
        while len(rows) < count:
            rows += await queue.next_batch(count - len(rows))
    return rows


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[DurableQueue]:
    q = DurableQueue(tmp_path / "queue.db")
    await q.open()
    yield q
    await q.close()


Harness = Callable[..., Awaitable[tuple[Hl7Channel, QueueSink]]]


@pytest.fixture
async def start(queue: DurableQueue) -> AsyncIterator[Harness]:
    channels: list[Hl7Channel] = []

    async def start_channel(params: str = "", sink: QueueSink | None = None) -> tuple[Hl7Channel, QueueSink]:
        endpoint = parse_endpoint("mllp://127.0.0.1:0" + (f"?{params}" if params else ""))
        sink = sink if sink is not None else QueueSink(queue)
        channel = Hl7Channel("adt-in", endpoint, mllp_options(endpoint), sink)
        await channel.start()
        channels.append(channel)
        return channel, sink

    yield start_channel
    for channel in channels:
        await channel.stop(drain_timeout=1.0)


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[Hl7Channel], Awaitable[Client]]]:
    clients: list[Client] = []

    async def open_client(channel: Hl7Channel) -> Client:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", channel.port), BOUND_S)
        client = Client(reader, writer)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.close()


# ------------------------------------------------------------------ the four ACK modes


async def test_fast_mode_acks_aa_after_commit(start: Harness, connect, queue: DurableQueue) -> None:
    channel, sink = await start("ackMode=fast")
    assert channel.port > 0
    client = await connect(channel)
    await client.send(msg("C1"))
    assert msa(await client.ack()) == ("AA", "C1", "OK")
    [row] = await stored(queue, 1)
    assert row.body == msg("C1") and row.control_id == "C1" and row.channel == "adt-in"
    assert row.remote == client.local
    assert sink.accepted[0].sender == "LAB^HOSP"
    assert sink.accepted[0].message_type == "ADT^A01^ADT_A01"
    # the bot's reply is suppressed in fast mode
    assert channel.deliver_reply(client.local, "C1", "MSH|^~\\&|a\rMSA|AE|C1\r") is False
    stats = channel.stats()
    assert stats["replies_suppressed"] == 1 and stats["acks_positive"] == 1
    assert stats["messages_received"] == 1 and stats["connections_open"] == 1


async def test_enhanced_aa_is_fast_mode(start: Harness, connect) -> None:
    channel, _ = await start("enhanced=aa")
    client = await connect(channel)
    await client.send(msg("E1"))
    assert msa(await client.ack())[:2] == ("AA", "E1")


async def test_two_phase_ca_then_bot_reply(start: Harness, connect, queue: DurableQueue) -> None:
    channel, _ = await start("enhanced=true")
    client = await connect(channel)
    await client.send(msg("T1"))
    assert msa(await client.ack()) == ("CA", "T1", "Commit Accept")
    await stored(queue, 1)
    reply = "MSH|^~\\&|BOT|CLOUD|LAB|HOSP|20240101||ACK^A01^ACK|R1|P|2.5.1\rMSA|AE|T1|bad patient\r"
    assert channel.deliver_reply(client.local, "T1", reply) is True
    assert await client.ack() == reply.encode()
    # a second reply for the same message is late
    assert channel.deliver_reply(client.local, "T1", reply) is False
    assert channel.stats()["replies_late"] == 1


@pytest.mark.parametrize(
    "level,forwarded",
    [("AL", {"AA", "AE", "AR"}), ("NE", set()), ("ER", {"AE", "AR"}), ("SU", {"AA"})],
)
async def test_two_phase_app_level_ack_filter(start: Harness, connect, level: str, forwarded: set[str]) -> None:
    channel, _ = await start(f"ackMode=two-phase&appLevelAck={level}")
    client = await connect(channel)
    codes = ["AA", "AE", "AR"]
    await client.send(*(msg(f"M{code}") for code in codes))
    assert [msa(a)[:2] for a in await client.acks(3)] == [("CA", f"M{code}") for code in codes]
    results = {
        code: channel.deliver_reply(client.local, f"M{code}", f"MSH|^~\\&|B\rMSA|{code}|M{code}\r")
        for code in codes
    }
    assert {code for code, ok in results.items() if ok} == forwarded
    got = await client.acks(len(forwarded))
    assert [msa(a)[0] for a in got] == [c for c in codes if c in forwarded]
    # a non-ACK body is always forwarded, whatever appLevelAck says
    await client.send(msg("Q1"))
    assert msa(await client.ack())[0] == "CA"
    assert channel.deliver_reply(client.local, "Q1", "MSH|^~\\&|B\rQAK|1|OK\r") is True
    assert await client.ack() == b"MSH|^~\\&|B\rQAK|1|OK\r"
    assert channel.stats()["replies_suppressed"] == 3 - len(forwarded)


async def test_original_mode_reply_is_the_ack(start: Harness, connect, queue: DurableQueue) -> None:
    channel, _ = await start()
    client = await connect(channel)
    await client.send(msg("O1"), msg("O2"), msg("O3"))
    rows = await stored(queue, 3)
    assert [r.control_id for r in rows] == ["O1", "O2", "O3"]
    # replies arrive out of order; ACKs still leave in order of receipt
    reply = "MSH|^~\\&|BOT|CLOUD|LAB|HOSP|20240101||ACK|X|P|2.5.1\rMSA|AA|{}|done\r"
    assert channel.deliver_reply(client.local, "O3", reply.format("O3")) is True
    assert channel.deliver_reply(client.local, "O2", "bot crashed: KeyError", status_code=400) is True
    assert channel.deliver_reply(client.local, "O1", reply.format("O1")) is True
    acks = await client.acks(3)
    assert acks[0] == reply.format("O1").encode()
    assert msa(acks[1]) == ("AE", "O2", "bot crashed: KeyError")
    assert b"ERR|" in acks[1]
    assert acks[2] == reply.format("O3").encode()


async def test_original_mode_hl7_error_reply_is_forwarded(start: Harness, connect) -> None:
    channel, _ = await start()
    client = await connect(channel)
    await client.send(msg("O9"))
    await wait_until(lambda: channel.stats()["messages_received"] == 1)
    body = "MSH|^~\\&|BOT\rMSA|AR|O9|rejected by bot\r"
    assert channel.deliver_reply(client.local, "O9", body, status_code=500) is True
    assert await client.ack() == body.encode()


async def test_original_mode_timeout_answers_ar_and_discards_late_reply(
    start: Harness, connect, queue: DurableQueue
) -> None:
    channel, _ = await start("responseTimeoutMs=150")
    client = await connect(channel)
    await client.send(msg("S1"))
    assert msa(await client.ack()) == ("AR", "S1", "no response from hub within 0.15 s")
    [row] = await stored(queue, 1)  # still queued: it will be delivered
    assert row.control_id == "S1"
    assert channel.deliver_reply(client.local, "S1", "MSH|^~\\&|B\rMSA|AA|S1\r") is False
    stats = channel.stats()
    assert stats["replies_timed_out"] == 1 and stats["replies_late"] == 1


async def test_immediate_mode_acks_before_storage(start: Harness, connect, queue: DurableQueue) -> None:
    channel, sink = await start("ackMode=immediate")
    client = await connect(channel)
    await client.send(msg("I1"))
    assert msa(await client.ack())[:2] == ("AA", "I1")
    assert [r.control_id for r in sink.immediate] == ["I1"]
    assert queue.stats()["committed"] == 0 and queue.stats()["submitted_waiting"] == 0
    assert channel.deliver_reply(client.local, "I1", "MSH|^~\\&|B\rMSA|AA|I1\r") is False


class AckWatchingSink(QueueSink):
    """Notes, for each immediate record, how many AAs the channel had written when it arrived."""

    def __init__(self, queue: DurableQueue | None) -> None:
        super().__init__(queue)
        self.channel: Hl7Channel | None = None
        self.acks_written_at_accept: list[int] = []

    def accept(self, record: InboundRecord, *, durable: bool, dedup: DuplicatePolicy,
               on_commit: Callable[[CommitResult], None] | None) -> None:
        assert self.channel is not None
        self.acks_written_at_accept.append(self.channel.counters.answers.get("AA", 0))
        super().accept(record, durable=durable, dedup=dedup, on_commit=on_commit)


async def test_immediate_mode_writes_the_acks_before_handing_records_on(start: Harness, connect,
                                                                        queue: DurableQueue) -> None:
    sink = AckWatchingSink(queue)
    channel, _ = await start("ackMode=immediate", sink=sink)
    sink.channel = channel
    client = await connect(channel)
    await client.send(msg("I1"), msg("I2"))  # one chunk: both ACKs in one write, then both records
    assert [msa(await client.ack())[:2] for _ in range(2)] == [("AA", "I1"), ("AA", "I2")]
    await wait_until(lambda: len(sink.immediate) == 2)
    assert [r.control_id for r in sink.immediate] == ["I1", "I2"]
    # each record moved on only after its own ACK was written (both, when they came in one chunk)
    assert all(written > index for index, written in enumerate(sink.acks_written_at_accept))


# ------------------------------------------------------------------ MSH-15 / MSH-16


async def test_fast_mode_aa_follows_msh15(start: Harness, connect) -> None:
    """The fast-mode AA is the accept acknowledgment: MSH-15 decides, MSH-16 does not."""
    channel, _ = await start("ackMode=fast")
    client = await connect(channel)
    await client.send(msg("N1", msh15="NE"), msg("N2", msh15="ER"), msg("N3", msh15="SU"), msg("N4", msh15="AL"),
                      msg("N5", msh15="AL", msh16="NE"), msg("N6", msh16="NE"))
    acks = await client.acks(4)  # N1 (NE) and N2 (ER, success) get nothing
    assert [msa(a)[:2] for a in acks] == [("AA", "N3"), ("AA", "N4"), ("AA", "N5"), ("AA", "N6")]
    assert channel.stats()["acks_suppressed"] == 2


@pytest.mark.parametrize("params", ["ackMode=fast", "enhanced=aa", "ackMode=immediate"])
async def test_defect2_accept_ack_for_msh15_al_msh16_ne(start: Harness, connect, data_dir: Path, params: str) -> None:
    """Issue 13 defect 2: an ORU^R01 with MSH-15=AL, MSH-16=NE gets its AA (it got nothing)."""
    body = (data_dir / "oru_r01_200obx.hl7").read_bytes()
    header = hl7proto.parse_header(body)
    assert (header.accept_ack_type, header.app_ack_type) == ("AL", "NE")
    channel, _ = await start(params)
    client = await connect(channel)
    await client.send(body)
    assert msa(await client.ack())[:2] == ("AA", header.control_id)
    assert channel.stats()["acks_suppressed"] == 0


async def test_two_phase_honours_msh15_and_msh16(start: Harness, connect) -> None:
    channel, _ = await start("ackMode=two-phase")
    client = await connect(channel)
    await client.send(msg("P1", msh15="NE", msh16="AL"), msg("P2", msh15="AL", msh16="ER"))
    assert msa(await client.ack())[:2] == ("CA", "P2")  # P1's CA is suppressed by MSH-15=NE
    assert channel.deliver_reply(client.local, "P1", "MSH|^~\\&|B\rMSA|AA|P1\r") is True
    assert channel.deliver_reply(client.local, "P2", "MSH|^~\\&|B\rMSA|AA|P2\r") is False  # MSH-16=ER
    assert msa(await client.ack())[:2] == ("AA", "P1")


async def test_storage_error_gives_ce_when_msh15_is_er(start: Harness, connect) -> None:
    channel, _ = await start("ackMode=fast", sink=FailingSink(None))
    client = await connect(channel)
    await client.send(msg("F1", msh15="ER", msh16="NE"))
    assert msa(await client.ack()) == ("CE", "F1", "storage error: database or disk is full")


# ------------------------------------------------------------------ storage failure


@pytest.mark.parametrize("params,code", [("ackMode=fast", "CE"), ("ackMode=two-phase", "CE"), ("", "AE")])
async def test_storage_failure_never_acks_positively(start: Harness, connect, params: str, code: str) -> None:
    channel, _ = await start(params, sink=FailingSink(None))
    client = await connect(channel)
    await client.send(msg("X1"), msg("X2"))
    acks = await client.acks(2)
    assert [msa(a) for a in acks] == [(code, f"X{i}", "storage error: database or disk is full") for i in (1, 2)]
    assert all(b"ERR|" in a for a in acks)
    assert channel.stats()["acks_positive"] == 0


# ------------------------------------------------------------------ duplicates


async def test_duplicate_drop_acks_without_storing(start: Harness, connect, queue: DurableQueue) -> None:
    channel, _ = await start("ackMode=fast&duplicateBehavior=drop")
    client = await connect(channel)
    await client.send(msg("D1"))
    assert msa(await client.ack()) == ("AA", "D1", "OK")
    await client.send(msg("D1"))
    assert msa(await client.ack()) == ("AA", "D1", "duplicate: already received")
    assert len(await stored(queue, 1)) == 1


async def test_duplicate_reject(start: Harness, connect) -> None:
    channel, _ = await start("ackMode=two-phase&duplicateBehavior=reject")
    client = await connect(channel)
    await client.send(msg("R1"))
    assert msa(await client.ack())[0] == "CA"
    await client.send(msg("R1"))
    code, control_id, text = msa(await client.ack())
    assert (code, control_id) == ("CR", "R1") and "duplicate" in text


# ------------------------------------------------------------------ charsets


async def test_charsets(start: Harness, connect, queue: DurableQueue) -> None:
    channel, _ = await start("ackMode=fast")
    client = await connect(channel)
    utf8 = message("U8", charset="UNICODE UTF-8", pid_name="MÜLLER^JÖRG").encode("utf-8")
    latin1 = message("L1", charset="8859/1", pid_name="MÜLLER^JÖRG").encode("latin-1")
    utf16 = message("W16", pid_name="李^小龙").encode("utf-16")  # with BOM
    await client.send(utf8, latin1, utf16)
    acks = await client.acks(3)
    assert [msa(a)[:2] for a in acks] == [("AA", "U8"), ("AA", "L1"), ("AA", "W16")]
    assert acks[2].startswith(b"\xff\xfe")  # a UTF-16 message gets a UTF-16 ACK
    rows = await stored(queue, 3)
    assert [r.body for r in rows] == [utf8, latin1, utf16]


@pytest.mark.parametrize("params,code", [("ackMode=fast", "AR"), ("ackMode=two-phase", "CR"), ("", "AR")])
async def test_undecodable_messages_are_rejected_and_not_stored(
    start: Harness, connect, params: str, code: str
) -> None:
    channel, sink = await start(params)
    client = await connect(channel)
    unknown = msg("K1", charset="KLINGON-8")
    bad_utf8 = message("B1", charset="UNICODE UTF-8").encode("latin-1") + b"PID|\xff\xfe\r"
    await client.send(unknown, bad_utf8)
    first, second = await client.acks(2)
    assert msa(first)[:2] == (code, "K1") and "KLINGON-8" in msa(first)[2]
    assert msa(second)[:2] == (code, "B1") and "UTF-8" in msa(second)[2]
    assert b"ERR|" in first and b"ERR|" in second
    assert sink.accepted == []
    assert channel.stats()["messages_rejected"] == 2


# ------------------------------------------------------------------ framing


async def test_junk_between_frames_and_one_byte_writes(start: Harness, connect, queue: DurableQueue) -> None:
    channel, _ = await start("ackMode=fast")
    client = await connect(channel)
    stream = b"garbage\r\n" + encode(msg("J1")) + b"\x00\x00 more junk" + encode(msg("J2")) + b"\n"
    for i in range(len(stream)):
        client.writer.write(stream[i : i + 1])
        await client.writer.drain()
    assert [msa(a)[:2] for a in await client.acks(2)] == [("AA", "J1"), ("AA", "J2")]
    assert [r.body for r in await stored(queue, 2)] == [msg("J1"), msg("J2")]
    assert channel.stats()["discarded_bytes"] > 0


async def test_oversize_frame_gets_ar_and_connection_keeps_working(start: Harness, connect) -> None:
    channel, sink = await start("ackMode=fast&maxFrameSize=2000")
    client = await connect(channel)
    big = msg("BIG", trailer="X" * 5000)
    await client.send(big, msg("OK1"))
    first, second = await client.acks(2)
    assert msa(first)[:2] == ("AR", "BIG") and "2000" in msa(first)[2]
    assert msa(second)[:2] == ("AA", "OK1")
    assert [r.control_id for r in sink.accepted] == ["OK1"]
    # oversize without a readable MSH: a framing error, still no disconnect
    await client.send(b"Z" * 3000, msg("OK2"))
    assert msa(await client.ack())[:2] == ("AA", "OK2")
    assert channel.stats()["framing_errors"] == 1


async def test_truncated_msh(start: Harness, connect, queue: DurableQueue) -> None:
    channel, _ = await start("ackMode=fast")
    client = await connect(channel)
    await client.send(b"MSH", b"MS", b"MSH|^~\\&|LAB|HOSP", msg("T2"))
    first, second = await client.acks(2)
    # a readable MSH without MSH-10 is still acknowledged (MSA-2 empty) and stored
    assert msa(first)[:2] == ("AA", "")
    assert msa(second)[:2] == ("AA", "T2")
    assert channel.stats()["framing_errors"] == 2
    assert len(await stored(queue, 2)) == 2


async def test_consecutive_framing_errors_close_the_connection(start: Harness, connect) -> None:
    channel, _ = await start("ackMode=fast")
    client = await connect(channel)
    await client.send(*([b"not hl7"] * MAX_CONSECUTIVE_FRAMING_ERRORS))
    assert await client.closed_by_peer()
    stats = channel.stats()
    assert stats["framing_errors"] == MAX_CONSECUTIVE_FRAMING_ERRORS
    assert stats["connections_closed_for_errors"] == 1


async def test_junk_flood_closes_the_connection(start: Harness, connect) -> None:
    channel, _ = await start("ackMode=fast")
    client = await connect(channel)
    await client.send(msg("G1"))
    assert msa(await client.ack())[0] == "AA"
    client.writer.write(b"\x00" * (1024 * 1024 + 10))
    assert await client.closed_by_peer()
    assert channel.stats()["connections_closed_for_errors"] == 1


async def test_disconnect_mid_frame_keeps_accepted_messages(start: Harness, connect, queue: DurableQueue) -> None:
    channel, _ = await start("ackMode=fast")
    client = await connect(channel)
    await client.send(msg("K1"), msg("K2"), raw=b"")
    assert len(await client.acks(2)) == 2
    client.writer.write(b"\x0b" + msg("K3")[:30])
    await client.writer.drain()
    await client.close()
    await wait_until(lambda: channel.stats()["connections_open"] == 0)
    rows = await stored(queue, 2)
    assert [r.control_id for r in rows] == ["K1", "K2"]
    assert channel.stats()["messages_received"] == 2


# ------------------------------------------------------------------ concurrency and order


async def test_ack_order_under_pipelining(start: Harness, connect, queue: DurableQueue) -> None:
    channel, _ = await start("ackMode=fast")
    client = await connect(channel)
    ids = [f"P{i:02d}" for i in range(20)]
    await client.send(*(msg(i) for i in ids))
    assert [msa(a)[1] for a in await client.acks(20)] == ids
    assert [r.control_id for r in await stored(queue, 20)] == ids


async def test_hundred_concurrent_senders(start: Harness, connect, queue: DurableQueue) -> None:
    channel, _ = await start("ackMode=fast")
    clients = await asyncio.gather(*(connect(channel) for _ in range(100)))

    async def lock_step(index: int, client: Client) -> list[str]:
        got = []
        for n in range(3):
            await client.send(msg(f"S{index}-{n}"))
            got.append(msa(await client.ack())[1])
        return got

    results = await asyncio.gather(*(lock_step(i, c) for i, c in enumerate(clients)))
    assert results == [[f"S{i}-{n}" for n in range(3)] for i in range(100)]
    assert len(await stored(queue, 300)) == 300
    stats = channel.stats()
    assert stats["connections_total"] == 100 and stats["acks_positive"] == 300


# ------------------------------------------------------------------ connection limits and flow control


async def test_max_connections(start: Harness, connect) -> None:
    """Full of senders with traffic: a newcomer is refused (idle ones are evicted: test_idle.py)."""
    channel, _ = await start("ackMode=fast&maxConnections=2")
    first, second = await connect(channel), await connect(channel)
    await wait_until(lambda: channel.stats()["connections_open"] == 2)
    for index, client in enumerate((first, second)):
        await client.send(msg(f"A0{index}"))
        assert msa(await client.ack())[0] == "AA"
    third = await connect(channel)
    assert await third.closed_by_peer()
    assert channel.stats()["connections_refused"] == 1
    assert channel.stats()["connections_evicted"] == 0
    await first.send(msg("A1"))
    assert msa(await first.ack())[0] == "AA"
    await second.close()
    await wait_until(lambda: channel.stats()["connections_open"] == 1)
    fourth = await connect(channel)
    await fourth.send(msg("A2"))
    assert msa(await fourth.ack())[0] == "AA"


async def test_idle_timeout_closes_connection(start: Harness, connect) -> None:
    channel, _ = await start("ackMode=fast&idleTimeoutMs=100")
    client = await connect(channel)
    await client.send(msg("Z1"))
    assert msa(await client.ack())[0] == "AA"
    assert await client.closed_by_peer()
    assert channel.stats()["connections_idle_closed"] == 1


async def test_pause_and_resume_reading(start: Harness, connect) -> None:
    channel, _ = await start("ackMode=fast")
    client = await connect(channel)
    await wait_until(lambda: channel.stats()["connections_open"] == 1)
    channel.pause_reading()
    await client.send(msg("W1"))
    await asyncio.sleep(0.05)
    assert channel.stats()["messages_received"] == 0
    channel.resume_reading()
    assert msa(await client.ack())[:2] == ("AA", "W1")


async def test_messages_per_min_throttles_dispatch(start: Harness, connect) -> None:
    channel, _ = await start("ackMode=immediate&messagesPerMin=1200")  # one per 50 ms
    client = await connect(channel)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await client.send(msg("T1"), msg("T2"), msg("T3"))
    assert [msa(a)[1] for a in await client.acks(3)] == ["T1", "T2", "T3"]
    assert loop.time() - began >= 0.09  # two intervals at least: the throttle, not a speed test


async def test_assign_seq_no(start: Harness, connect, queue: DurableQueue) -> None:
    channel, _ = await start("ackMode=fast&assignSeqNo=true")
    client = await connect(channel)
    await client.send(msg("Q1"), msg("Q2"), msg("Q3"))
    assert len(await client.acks(3)) == 3
    rows = await stored(queue, 3)
    assert [r.body.split(b"\r")[0].split(b"|")[12] for r in rows] == [b"0", b"1", b"2"]
    assert rows[0].body.split(b"\r")[1:] == msg("Q1").split(b"\r")[1:]


# ------------------------------------------------------------------ replies and shutdown


async def test_reply_for_a_gone_connection(start: Harness, connect, queue: DurableQueue) -> None:
    channel, _ = await start()
    client = await connect(channel)
    await client.send(msg("G1"))
    await stored(queue, 1)
    remote = client.local
    await client.close()
    await wait_until(lambda: channel.stats()["connections_open"] == 0)
    assert channel.deliver_reply(remote, "G1", "MSH|^~\\&|B\rMSA|AA|G1\r") is False
    assert channel.stats()["replies_no_connection"] == 1


async def test_stop_writes_outstanding_acks_then_closes(connect, queue: DurableQueue) -> None:
    endpoint = parse_endpoint("mllp://127.0.0.1:0?ackMode=fast")
    channel = Hl7Channel("adt-in", endpoint, mllp_options(endpoint), QueueSink(queue))
    await channel.start()
    try:
        client = await connect(channel)
        await client.send(*(msg(f"Y{i}") for i in range(5)))
        await wait_until(lambda: channel.stats()["messages_received"] == 5)
    finally:
        await channel.stop(drain_timeout=BOUND_S)
    assert [msa(a)[1] for a in await client.acks(5)] == [f"Y{i}" for i in range(5)]
    assert await client.closed_by_peer()
    assert channel.stats()["connections_open"] == 0


async def test_throttled_oversize_reject_keeps_its_place(start: Harness, connect) -> None:
    channel, _ = await start("ackMode=immediate&messagesPerMin=6000&maxFrameSize=2000")
    client = await connect(channel)
    await client.send(msg("A1"), msg("BIG", trailer="X" * 5000), msg("A2"))
    assert [msa(a)[:2] for a in await client.acks(3)] == [("AA", "A1"), ("AR", "BIG"), ("AA", "A2")]


# ------------------------------------------------------------------ the mllp kind on the channel seam (issue 13)


async def test_registry_builds_the_channel_from_a_context(connect, queue: DurableQueue, tmp_path: Path) -> None:
    kind = channel_kind("mllp")
    endpoint = parse_endpoint("mllp://127.0.0.1:0?ackMode=two-phase&encoding=latin1")
    options = kind.parse_options(endpoint)
    sink = QueueSink(queue)
    channel = kind.create("lab-in", endpoint, options, ChannelContext(sink=sink, data_dir=tmp_path))
    assert isinstance(channel, Channel) and isinstance(channel, Hl7Channel)
    assert (channel.kind, channel.wants_replies, channel.encoding) == ("mllp", True, "iso8859-1")
    await channel.start()
    try:
        client = await connect(channel)
        await client.send(msg("K1"))
        assert msa(await client.ack())[:2] == ("CA", "K1")
        assert sink.accepted[0].channel == "lab-in"
    finally:
        await channel.stop(drain_timeout=1.0)
    assert channel.listening_sockets() == []


@pytest.mark.parametrize("params,wants", [("", True), ("ackMode=two-phase", True), ("ackMode=fast", False),
                                          ("ackMode=immediate", False)])
def test_wants_replies_per_mode(params: str, wants: bool, tmp_path: Path) -> None:
    endpoint = parse_endpoint("mllp://127.0.0.1:0" + (f"?{params}" if params else ""))
    channel = channel_kind("mllp").create("c", endpoint, mllp_options(endpoint),
                                          ChannelContext(sink=QueueSink(None), data_dir=tmp_path))
    assert channel.wants_replies is wants


async def test_start_on_a_handed_over_socket_keeps_the_port(connect, queue: DurableQueue, tmp_path: Path) -> None:
    """A reload/upgrade hands the listening socket on: the new channel serves the same port."""
    endpoint = parse_endpoint("mllp://127.0.0.1:0?ackMode=fast")
    context = ChannelContext(sink=QueueSink(queue), data_dir=tmp_path)
    old = Hl7Channel("adt-in", endpoint, mllp_options(endpoint), context)
    await old.start()
    new = Hl7Channel("adt-in", endpoint, mllp_options(endpoint), context)
    try:
        [listening] = old.listening_sockets()
        port = listening.getsockname()[1]
        handed = socket.socket(fileno=os.dup(listening.fileno()))
        await new.start(sock=handed)
        await old.stop(drain_timeout=1.0)
        assert new.port == port
        client = await connect(new)
        await client.send(msg("H1"))
        assert msa(await client.ack())[:2] == ("AA", "H1")
        assert new.stats()["unitsIn"] == 1 and old.stats()["unitsIn"] == 0
    finally:
        await old.stop(drain_timeout=1.0)
        await new.stop(drain_timeout=1.0)


async def test_start_on_a_socket_bound_elsewhere(connect, queue: DurableQueue, tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    endpoint = parse_endpoint("mllp://127.0.0.1:1?ackMode=fast")  # the handed socket wins over the URL's port
    channel = Hl7Channel("adt-in", endpoint, mllp_options(endpoint), ChannelContext(QueueSink(queue), tmp_path))
    await channel.start(sock=sock)
    try:
        assert channel.port == sock.getsockname()[1]
        client = await connect(channel)
        await client.send(msg("S1"))
        assert msa(await client.ack())[:2] == ("AA", "S1")
    finally:
        await channel.stop(drain_timeout=1.0)


async def test_stats_have_the_shared_shape_plus_the_hl7_counters(start: Harness, connect) -> None:
    channel, _ = await start("ackMode=fast")
    client = await connect(channel)
    await client.send(msg("A1"), msg("A2"), msg("K1", charset="KLINGON-8"), b"junk")
    assert len(await client.acks(3)) == 3
    await wait_until(lambda: channel.stats()["framing_errors"] == 1)
    stats = channel.stats()
    assert stats["kind"] == "mllp"
    assert (stats["connectionsOpen"], stats["connectionsTotal"], stats["unitsIn"], stats["unitsOut"]) == (1, 1, 2, 3)
    assert stats["answers"] == {"AA": 2, "AR": 1} and sum(stats["latencyMs"].values()) == 3
    assert set(stats["latencyMs"]) <= {"0.5", "1", "2", "5", "10", "50", "100", "500", "1000", "5000", "+Inf"}
    assert stats["errors"] == 2 and stats["bytesIn"] == stats["bytes_received"] > 0
    assert stats["bytesOut"] == stats["bytes_sent"] > 0 and stats["controlIdReused"] == 0
    # today's HL7 keys stay for existing consumers
    assert stats["acks_positive"] == 2 and stats["acks_negative"] == 1 and stats["connections_open"] == 1
    assert stats["ack_mode"] == "fast" and stats["acks_pending"] == 0


@pytest.mark.parametrize("log_phi", [False, True])
async def test_bodies_are_logged_only_with_log_phi(connect, queue: DurableQueue, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture, log_phi: bool) -> None:
    endpoint = parse_endpoint("mllp://127.0.0.1:0?ackMode=fast")
    channel = channel_kind("mllp").create("adt-in", endpoint, mllp_options(endpoint),
                                          ChannelContext(QueueSink(queue), tmp_path, log_phi=log_phi))
    caplog.set_level(logging.DEBUG, logger="medagent")
    await channel.start()
    try:
        client = await connect(channel)
        await client.send(msg("P1", pid_name="SECRET^PATIENT"), msg("P2", charset="KLINGON-8", pid_name="SECRET^TWO"))
        assert len(await client.acks(2)) == 2
    finally:
        await channel.stop(drain_timeout=1.0)
    assert ("SECRET" in caplog.text) is log_phi
    assert "SECRET^TWO" not in caplog.text  # a rejected body is never logged


async def test_reused_control_id_with_other_content_is_delivered_and_counted(
    start: Harness, connect, queue: DurableQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 13 defect 3 at the channel: both messages get AA, both are stored as new rows,
    the reuse is counted (controlIdReused) and logged once without the bodies."""
    channel, _ = await start("ackMode=fast")
    client = await connect(channel)
    caplog.set_level(logging.WARNING, logger="medagent.channels.hl7")
    await client.send(msg("RE1", pid_name="FIRST^PATIENT"))
    assert msa(await client.ack())[:2] == ("AA", "RE1")
    await client.send(msg("RE1", pid_name="OTHER^PATIENT"))
    assert msa(await client.ack())[:2] == ("AA", "RE1")
    rows = await stored(queue, 2)
    assert [row.body for row in rows] == [msg("RE1", pid_name="FIRST^PATIENT"), msg("RE1", pid_name="OTHER^PATIENT")]
    assert rows[1].duplicate_of is None
    assert channel.stats()["controlIdReused"] == 1
    reuse_lines = [r for r in caplog.records if "reuses a recent control id" in r.getMessage()]
    assert len(reuse_lines) == 1 and "PATIENT" not in caplog.text
