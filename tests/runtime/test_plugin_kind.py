"""A channel kind the runtime has never heard of, added by registering it by scheme (issue 13, "done
when": a new kind is a core plus an adapter registered by scheme, without touching the runtime).

The test kind ``medagent-test-line`` is a line protocol over TCP: each line is one unit, committed
to the real queue through the runtime's Intake, then answered ``OK <row id>``. Its ``failStart=true``
option makes ``start`` fail, which exercises the channel set's restore path: a changed channel on
the same address whose new configuration cannot start is put back as it was, on the same socket.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medagent.channels.base import (
    ChannelContext,
    ChannelKind,
    ChannelStats,
    base_stats,
    register_kind,
)
from medagent.channels.endpoint import Endpoint, bool_param, parse_endpoint
from medagent.config import ChannelConfig, channel_options
from medagent.queue import DurableQueue
from medagent.records import OCTET_STREAM_CONTENT_TYPE, CommitResult, DuplicatePolicy, InboundRecord
from medagent.runtime.channel_set import ChannelSet, DesiredChannels, channel_address
from medagent.runtime.intake import Intake

SCHEME = "medagent-test-line"


@dataclass(frozen=True, slots=True)
class LineOptions:
    fail_start: bool


class LineChannel:
    """The adapter: moves lines between sockets and the sink (the 'core' is splitting on \\n)."""

    def __init__(self, name: str, endpoint: Endpoint, options: LineOptions, context: ChannelContext) -> None:
        self.name, self.endpoint, self.options, self.context = name, endpoint, options, context
        self.stats_ = ChannelStats()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    kind = SCHEME
    wants_replies = False
    encoding = "utf-8"

    async def start(self, sock: socket.socket | None = None) -> None:
        if self.options.fail_start:
            raise RuntimeError("refuses to start (failStart=true)")
        if sock is not None:
            self._server = await asyncio.start_server(self._serve, sock=sock)
        else:
            self._server = await asyncio.start_server(self._serve, self.endpoint.host, self.endpoint.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        host, port = writer.get_extra_info("peername")[:2]
        remote = f"{host}:{port}"
        try:
            while line := await reader.readline():
                self.stats_.units_in += 1

                def answer(result: CommitResult, writer: asyncio.StreamWriter = writer) -> None:
                    writer.write(f"OK {result.row_id}\n".encode() if result.ok else b"ERR\n")

                record = InboundRecord(self.name, remote, remote, str(self.stats_.units_in), "LINE", line.rstrip(b"\n"),
                                       time.time(), OCTET_STREAM_CONTENT_TYPE)
                self.context.sink.accept(record, durable=True, dedup=DuplicatePolicy.OFF, on_commit=answer)
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def stop(self, drain_timeout: float = 5.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        await server.wait_closed()

    def listening_sockets(self) -> list[socket.socket]:
        return list(self._server.sockets) if self._server is not None else []  # type: ignore[arg-type]

    def deliver_reply(self, remote: str, control_id: str, body: str, status_code: int = 200) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return base_stats(SCHEME, self.stats_)


register_kind(ChannelKind(
    scheme=SCHEME, parameters=("failStart",),
    parse_options=lambda endpoint: LineOptions(bool_param(endpoint, "failStart", False)),
    create=LineChannel,  # type: ignore[arg-type]
    description="test kind: one unit per line",
))


def line_channel(name: str, query: str = "", port: int = 0) -> ChannelConfig:
    endpoint = parse_endpoint(f"{SCHEME}://127.0.0.1:{port}" + (f"?{query}" if query else ""))
    return ChannelConfig(name=name, endpoint=endpoint, options=channel_options(endpoint))


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[DurableQueue]:
    q = DurableQueue(tmp_path / "queue.sqlite3")
    await q.open()
    try:
        yield q
    finally:
        await q.close()


async def roundtrip(port: int, line: bytes) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        writer.write(line + b"\n")
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


async def test_a_registered_kind_runs_and_its_failed_restart_is_put_back_on_the_same_socket(queue, tmp_path) -> None:
    desired = DesiredChannels((line_channel("lines"),))

    async def source() -> DesiredChannels:
        return desired

    channels = ChannelSet(ChannelContext(sink=Intake(queue), data_dir=tmp_path), source)
    report = await channels.start()
    try:
        assert report.started == ["lines"]
        lines = channels.get("lines")
        assert lines is not None
        port = int(channel_address(lines).rsplit(":", 1)[1])
        assert (await roundtrip(port, b"hello")).startswith(b"OK ")  # committed to the real queue

        desired = DesiredChannels((line_channel("lines", "failStart=true"),))
        report = await channels.reload()
        assert report.failed == {"lines": "cannot start: refuses to start (failStart=true) (the previous configuration keeps running)"}
        restored = channels.get("lines")
        assert restored is not None and restored is not lines
        assert restored.options == LineOptions(False)  # type: ignore[attr-defined]
        assert channel_address(restored) == f"{SCHEME}://127.0.0.1:{port}"  # on the handed-over socket
        assert (await roundtrip(port, b"again")).startswith(b"OK ")
    finally:
        await channels.close()
