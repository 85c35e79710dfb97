"""Async helpers of the runtime tests: an MLLP sender on the test's own loop, channel configs.

The blocking `serve_harness.MllpClient` cannot talk to a channel that runs on the test's event
loop (it would block the loop); :class:`AsyncMllpClient` does the same over asyncio streams.
"""

from __future__ import annotations

import asyncio
import socket

from medagent.channels.endpoint import parse_endpoint
from medagent.config import ChannelConfig, channel_options

SB, EB, CR = b"\x0b", b"\x1c", b"\r"
IO_TIMEOUT_S = 10.0


def hl7(control_id: str, text: str = "DOE^JOHN") -> bytes:
    return (f"MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r"
            f"EVN|A01|20240101120000\rPID|1||{control_id}^^^HOSP^MR||{text}||19700101|M\r").encode()


def msa(ack: bytes) -> tuple[str, str]:
    """(MSA-1, MSA-2) of an ACK."""
    for segment in ack.split(b"\r"):
        if segment.startswith(b"MSA|"):
            fields = segment.decode("latin-1").split("|") + ["", ""]
            return fields[1], fields[2]
    raise AssertionError(f"no MSA in {ack!r}")


def channel(name: str, port: int = 0, query: str = "ackMode=fast", bot: str = "medagent.hub.bots.ack:handler") -> ChannelConfig:
    endpoint = parse_endpoint(f"mllp://127.0.0.1:{port}" + (f"?{query}" if query else ""))
    return ChannelConfig(name=name, endpoint=endpoint, bot=bot, options=channel_options(endpoint))


def free_port() -> int:
    """A port that was free a moment ago (bound to port 0 and read back)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def blocker() -> socket.socket:
    """A listening socket that occupies a port (the caller closes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def port_is_closed(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


class AsyncMllpClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> AsyncMllpClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), IO_TIMEOUT_S)
        return cls(reader, writer)

    async def send(self, message: bytes) -> None:
        self.writer.write(SB + message + EB + CR)
        await self.writer.drain()

    async def read_ack(self) -> bytes:
        frame = await asyncio.wait_for(self.reader.readuntil(EB + CR), IO_TIMEOUT_S)
        return frame[frame.index(SB) + 1 : -2]

    async def roundtrip(self, message: bytes) -> bytes:
        await self.send(message)
        return await self.read_ack()

    async def closed_by_peer(self) -> bool:
        """True when the peer closed the connection (EOF within the timeout)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), IO_TIMEOUT_S)
        except ConnectionError:
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
