"""Load harness for the laboratory channels: an agent-side process and lock-step instruments.

``python benchmarks/astm_load.py serve <endpoint-url> <queue.sqlite>`` runs one channel of any
lab kind (``astm://``, ``tcp://``) over a real DurableQueue (the runtime's wiring: the sink
submits, the final ASTM ACK waits for the commit) and prints its port. ``drive_astm`` and
``drive_bytestream`` play N instruments against it from another process, each lock-step:

* ASTM: ENQ, 5 frames (H P O R L, a 5-record result), EOT; one byte answer awaited per step,
  so a transmission is 6 round trips and is complete when the final frame's ACK (= commit) has
  arrived. Every message differs (sample id), so the queue's dedup never drops one.
* byte stream: one ``STX ... ETX`` frame of ~200 bytes with ``autoRespond=%03:%06``, the ACK
  awaited (autoRespond is a reflex before the commit, so this measures framing + intake).

``python benchmarks/astm_load.py baseline`` is the same-sitting ceiling: a server that answers ACK
to every chunk (no framing, no checksum, no queue), driven by the same instruments.

Used by benchmarks/test_astm.py.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from medagent.proto.astm import build_frame

ENQ, ACK, EOT = b"\x05", b"\x06", b"\x04"


def result_frames(instrument: int, sequence: int) -> list[bytes]:
    records = [
        f"H|\\^&|{instrument}-{sequence}||Analyzer^{instrument}|||||||P|1",
        f"P|1||PID{sequence:08d}||Doe^Jane||19700101|F",
        f"O|1|S{instrument:03d}{sequence:08d}||^^^GLU|R||||||N",
        f"R|1|^^^GLU|{4 + sequence % 50 / 10:.1f}|mmol/L|3.9-6.1|N||F||||20240101120000",
        "L|1|N",
    ]
    return [build_frame(i + 1, (r + "\r").encode(), final=True) for i, r in enumerate(records)]


async def _astm_instrument(port: int, instrument: int, stop_at: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sequence = 0
    try:
        while time.monotonic() < stop_at:
            sequence += 1
            writer.write(ENQ)
            if await reader.readexactly(1) != ACK:
                raise RuntimeError("ENQ not acknowledged")
            for data in result_frames(instrument, sequence):
                writer.write(data)
                if await reader.readexactly(1) != ACK:
                    raise RuntimeError("frame not acknowledged")
            writer.write(EOT)
            counts[instrument] += 1
    finally:
        writer.close()


async def _bytes_instrument(port: int, instrument: int, stop_at: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = b"\x02" + b"OBX|1|NM|GLU||5.4|mmol/L|3.9-6.1|N|||F" * 5 + b"\x03"
    try:
        while time.monotonic() < stop_at:
            writer.write(payload)
            if await reader.readexactly(1) != ACK:
                raise RuntimeError("frame not acknowledged")
            counts[instrument] += 1
    finally:
        writer.close()


async def _drive(kind: str, port: int, instruments: int, seconds: float) -> float:
    counts = [0] * instruments
    stop_at = time.monotonic() + seconds
    play = _astm_instrument if kind == "astm" else _bytes_instrument
    started = time.monotonic()
    await asyncio.gather(*(play(port, i, stop_at, counts) for i in range(instruments)))
    return sum(counts) / (time.monotonic() - started)


def drive_astm(port: int, instruments: int, seconds: float) -> float:
    """ASTM transmissions per second (5-record results, final ACK after commit)."""
    return asyncio.run(_drive("astm", port, instruments, seconds))


def drive_bytestream(port: int, instruments: int, seconds: float) -> float:
    """Byte-stream frames per second (autoRespond ACK per frame)."""
    return asyncio.run(_drive("tcp", port, instruments, seconds))


async def _serve(url: str, db: Path) -> None:
    from medagent.channels.base import ChannelContext, channel_kind
    from medagent.channels.endpoint import parse_endpoint
    from medagent.queue import DurableQueue

    class Sink:
        def __init__(self, queue: DurableQueue) -> None:
            self.queue = queue

        def accept(self, record, *, durable, dedup, on_commit):  # type: ignore[no-untyped-def]
            self.queue.submit(record, on_commit or (lambda result: None), dedup)

    try:
        import uvloop  # the agent's loop in production

        uvloop.install()
    except ImportError:
        pass
    queue = DurableQueue(db)
    await queue.open()
    endpoint = parse_endpoint(url)
    kind = channel_kind(endpoint.scheme)
    channel = kind.create("bench", endpoint, kind.parse_options(endpoint),
                          ChannelContext(sink=Sink(queue), data_dir=db.parent))
    await channel.start()

    async def confirm() -> None:  # the hub side: settle delivered rows so memory stays flat
        while True:
            rows = await queue.next_batch(500)
            queue.confirm([row.row_id for row in rows])

    task = asyncio.create_task(confirm())
    print(channel.port, flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    finally:
        task.cancel()
        await channel.stop()
        await queue.close()


class _AckEverything(asyncio.Protocol):
    """The baseline: answer ACK to every chunk except a lone EOT; no parsing, no queue."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if data != EOT:
            self.transport.write(ACK)  # type: ignore[attr-defined]


async def _serve_baseline() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_AckEverything, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    try:
        await loop.run_in_executor(None, sys.stdin.read)
    finally:
        server.close()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        asyncio.run(_serve(sys.argv[2], Path(sys.argv[3])))
    elif len(sys.argv) == 2 and sys.argv[1] == "baseline":
        asyncio.run(_serve_baseline())
    else:
        raise SystemExit("usage: astm_load.py serve <endpoint-url> <queue.sqlite> | baseline")
