"""Lines for the laboratory kinds: one byte pipe to a device, over TCP or a serial port.

Theory of operation
-------------------
ASTM and byte-stream channels speak to a device over a *line*: an accepted TCP connection or an
open serial port. Their per-line logic (a :class:`LineHandler`) does not care which: it gets
``line_made(line)``, ``data_received(bytes)`` and ``line_lost(exc)``, and writes with
``line.write``. This module has the TCP side: :class:`TcpListener` accepts connections on the
endpoint's host:port (or a handed-over socket), wraps each in a :class:`TcpLine` and builds a
handler for it; :mod:`medagent.channels.serialport` has the serial side.

Invariants
----------
* A handler sees ``line_made`` once, then data, then ``line_lost`` once (also at stop).
* ``max_connections`` is enforced at accept: a connection beyond it is closed at once, logged.
* After :meth:`TcpListener.stop` no server, transport or line is left.
* No payload bytes in logs.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol, cast

__all__ = ["Line", "LineHandler", "TcpLine", "TcpListener"]

logger = logging.getLogger(__name__)


class Line(Protocol):
    """The writable side of a device line."""

    remote: str

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class LineHandler(Protocol):
    def line_made(self, line: Line) -> None: ...

    def data_received(self, data: bytes) -> None: ...

    def line_lost(self, exc: Exception | None) -> None: ...


class TcpLine(asyncio.Protocol):
    """An accepted TCP connection as a :class:`Line`, feeding one handler."""

    def __init__(self, listener: TcpListener) -> None:
        self.listener = listener
        self.remote = "?"
        self.transport: asyncio.Transport | None = None
        self.handler: LineHandler | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        peer = transport.get_extra_info("peername")
        self.remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # not every socket family takes these; harmless
                pass
        if not self.listener.admit(self):
            transport.close()
            return
        self.handler = self.listener.handler_factory()
        self.handler.line_made(self)

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        handler, self.handler = self.handler, None
        self.listener.release(self)
        if handler is not None:
            handler.line_lost(exc)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


class TcpListener:
    """Accepts device connections for one channel and gives each a handler."""

    def __init__(self, channel: str, kind: str, host: str, port: int,
                 handler_factory: Callable[[], LineHandler], *, max_connections: int = 100) -> None:
        self.channel = channel
        self.kind = kind
        self.host = host
        self.port = port
        self.handler_factory = handler_factory
        self.max_connections = max_connections
        self.lines: dict[str, TcpLine] = {}
        self.connections_total = 0
        self.connections_refused = 0
        self.paused = False
        self._server: asyncio.Server | None = None

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        try:
            if sock is not None:
                self._server = await loop.create_server(lambda: TcpLine(self), sock=sock)
            else:
                self._server = await loop.create_server(lambda: TcpLine(self), self.host, self.port)
        except OSError as exc:
            where = "the handed-over socket" if sock is not None else f"{self.host}:{self.port}"
            raise OSError(exc.errno, f"{self.kind} channel {self.channel}: cannot listen on {where}: "
                                     f"{exc.strerror or exc}") from exc
        name = self._server.sockets[0].getsockname()
        self.host, self.port = name[0], int(name[1])
        logger.debug("%s channel %s listening on %s:%d", self.kind, self.channel, self.host, self.port)

    def listening_sockets(self) -> list[Any]:
        return list(self._server.sockets) if self._server is not None else []

    def admit(self, line: TcpLine) -> bool:
        if self._server is None or len(self.lines) >= self.max_connections:
            self.connections_refused += 1
            logger.warning("%s channel %s: refused connection from %s (%s)", self.kind, self.channel, line.remote,
                           "stopping" if self._server is None else f"maxConnections={self.max_connections} reached")
            return False
        self.connections_total += 1
        self.lines[line.remote] = line
        if self.paused:
            line.pause_reading()
        logger.info("%s channel %s: connection from %s", self.kind, self.channel, line.remote)
        return True

    def release(self, line: TcpLine) -> None:
        if self.lines.get(line.remote) is line:
            del self.lines[line.remote]
            logger.info("%s channel %s: connection from %s closed", self.kind, self.channel, line.remote)

    def pause_reading(self) -> None:
        self.paused = True
        for line in list(self.lines.values()):
            line.pause_reading()

    def resume_reading(self) -> None:
        self.paused = False
        for line in list(self.lines.values()):
            line.resume_reading()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for line in list(self.lines.values()):
            line.close()
        await server.wait_closed()
        for _ in range(50):  # let connection_lost run (bounded)
            if not self.lines:
                break
            await asyncio.sleep(0.01)
        logger.info("%s channel %s stopped", self.kind, self.channel)
