"""Helpers shared by the laboratory-channel tests, and tests of the helpers themselves.

* :class:`QueueSink`: the runtime's InboundSink role played over a real DurableQueue in a temp
  dir (the runtime's own ``accept`` does exactly ``queue.submit``).
* :class:`TcpPeer` / :class:`PtyPeer`: an instrument script's end of a TCP connection or of a
  pseudo-terminal pair (``os.openpty``); reads are bounded in time.
* ``frames``/``session`` build instrument transmissions from the E1381 rules independently of
  the link core (checksums computed here by the standard's formula).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from medagent.queue import DurableQueue
from medagent.records import CommitResult, DuplicatePolicy, InboundRecord

ENQ, ACK, NAK, EOT, STX, ETX, ETB = b"\x05", b"\x06", b"\x15", b"\x04", b"\x02", b"\x03", b"\x17"
RESULT = [
    "H|\\^&|CTL1||Analyzer^2.1|||||||P|1",
    "P|1||PID001||Doe^Jane",
    "O|1|S0001||^^^GLU|R",
    "R|1|^^^GLU|5.4|mmol/L||N||F",
    "L|1|N",
]
WAIT = 5.0  # upper bound for any single wait in these tests


def frame(number: int, text: str | bytes, final: bool = True) -> bytes:
    """``STX FN text ETX|ETB C1 C2 CR LF``; checksum = sum(FN..ETX) mod 256 (LIS01-A2 §6.3.1.4)."""
    data = text.encode("latin-1") if isinstance(text, str) else text
    body = str(number % 8).encode() + data + (ETX if final else ETB)
    return STX + body + f"{sum(body) % 256:02X}".encode() + b"\r\n"


def frames(records: list[str]) -> list[bytes]:
    return [frame(i + 1, record + "\r") for i, record in enumerate(records)]


class QueueSink:
    """InboundSink over a real DurableQueue; ``fail`` makes every commit a storage error."""

    def __init__(self, queue: DurableQueue) -> None:
        self.queue = queue
        self.accepted: list[InboundRecord] = []
        self.results: list[CommitResult] = []

    def accept(self, record: InboundRecord, *, durable: bool, dedup: DuplicatePolicy,
               on_commit: Callable[[CommitResult], None] | None) -> None:
        self.accepted.append(record)
        assert durable and on_commit is not None
        callback = on_commit

        def settle(result: CommitResult) -> None:
            self.results.append(result)
            callback(result)

        self.queue.submit(record, settle, dedup)

    async def rows(self, count: int) -> list[Any]:
        """The first `count` committed rows (waits, bounded)."""
        rows: list[Any] = []
        for _ in range(100):
            if len(rows) >= count:
                break
            try:
                rows += await asyncio.wait_for(self.queue.next_batch(count - len(rows)), 0.05)
            except TimeoutError:
                pass
        return rows


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[DurableQueue]:
    q = DurableQueue(tmp_path / "queue.sqlite")
    await q.open()
    try:
        yield q
    finally:
        await q.close()


class TcpPeer:
    """The instrument's end of a TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> TcpPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def read(self, n: int, timeout: float = WAIT) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def silent(self, timeout: float) -> bool:
        """True when nothing arrives within `timeout` (used only to show an absent answer)."""
        try:
            await asyncio.wait_for(self.reader.read(1), timeout)
        except TimeoutError:
            return True
        return False

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class PtyPeer:
    """The instrument's end of a pseudo-terminal: the master side; the channel opens ``path``."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.path = os.ttyname(slave)
        os.close(slave)  # the channel opens the slave by path; the pty lives while master is open
        os.set_blocking(self.master, False)
        self._buf = bytearray()
        self._ready = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO while no slave is open
            data = b""
        if data:
            self._buf += data
            self._ready.set()

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    async def read(self, n: int, timeout: float = WAIT) -> bytes:
        deadline = self._loop.time() + timeout
        while len(self._buf) < n:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise TimeoutError(f"pty: wanted {n} bytes, have {bytes(self._buf)!r}")
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), remaining)
            except TimeoutError:
                pass
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def close(self) -> None:
        self._loop.remove_reader(self.master)
        os.close(self.master)


async def send_session(peer: TcpPeer | PtyPeer, records: list[str]) -> bytes:
    """Play one ENQ..EOT transmission lock-step; returns every answer byte received."""
    answers = b""
    peer.write(ENQ)
    answers += await peer.read(1)
    for data in frames(records):
        peer.write(data)
        answers += await peer.read(1)
    peer.write(EOT)
    return answers


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Wait (bounded) until predicate() holds; for effects that have no event to await."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# --------------------------------------------------------------------------- the helpers' own tests


def test_frame_helper_matches_standard_example() -> None:
    # A frame from LIS01-A2's rules computed by hand: "1H|\^&" + CR + ETX.
    body = b"1H|\\^&\r\x03"
    assert frame(1, "H|\\^&\r") == b"\x02" + body + b"%02X" % (sum(body) % 256) + b"\r\n"
    assert frame(8, "x", final=False)[1:2] == b"0" and frame(1, "x", final=False)[-5:-4] == ETB


async def test_queue_sink_commits_to_a_real_queue(queue: DurableQueue) -> None:
    sink = QueueSink(queue)
    results: list[CommitResult] = []
    record = InboundRecord("c", "r", "", "", "", b"x", 0.0, "application/octet-stream")
    sink.accept(record, durable=True, dedup=DuplicatePolicy.OFF, on_commit=results.append)
    rows = await sink.rows(1)
    assert rows[0].body == b"x" and results[0].ok
