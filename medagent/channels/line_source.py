"""Where a line-oriented channel's lines come from: a TCP (optionally TLS) listener or one serial port.

The ASTM and byte-stream kinds speak different protocols over the same two transports; this is
the transport half they share (start on an inherited socket, stop, pause/resume reading, the
bound address and the serial port's own stats), so each kind keeps only its protocol.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from medagent.channels.endpoint import Endpoint
from medagent.channels.listener import TlsTcpListener
from medagent.channels.serialport import SerialPortLine, SerialSettings
from medagent.channels.stream_listener import LineHandler
from medagent.channels.tls import server_tls

__all__ = ["LineSource"]


class LineSource:
    """A TCP listener (``serial is None``) or a self-reopening serial port feeding line handlers."""

    def __init__(self, name: str, kind: str, label: str, endpoint: Endpoint, serial: SerialSettings | None,
                 new_handler: Callable[[], LineHandler], max_connections: int) -> None:
        """`label` names the protocol in log lines ("astm", "byte-stream"); `kind` is the scheme."""
        self.name = name
        self.kind = kind
        self.label = label
        self.endpoint = endpoint
        self.serial_settings = serial
        self.new_handler = new_handler
        self.max_connections = max_connections
        self._listener: TlsTcpListener | None = None
        self._serial: SerialPortLine | None = None

    @property
    def host(self) -> str:
        return self._listener.host if self._listener is not None else self.endpoint.host

    @property
    def port(self) -> int:
        return self._listener.port if self._listener is not None else self.endpoint.port

    async def start(self, sock: socket.socket | None = None) -> None:
        if self.serial_settings is not None:
            self._serial = SerialPortLine(self.name, self.kind, self.serial_settings, self.new_handler)
            await self._serial.start()
            return
        self._listener = TlsTcpListener(self.name, self.label, self.endpoint.host, self.endpoint.port,
                                        self.new_handler, max_connections=self.max_connections,
                                        tls=server_tls(f"{self.label} channel {self.name}", self.endpoint))
        await self._listener.start(sock)

    async def stop(self) -> None:
        if self._serial is not None:
            await self._serial.stop()  # kept: its stats stay readable ("stopped")
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None

    def listening_sockets(self) -> list[socket.socket]:
        return self._listener.listening_sockets() if self._listener is not None else []

    def pause_reading(self) -> None:
        for target in (self._listener, self._serial):
            if target is not None:
                target.pause_reading()

    def resume_reading(self) -> None:
        for target in (self._listener, self._serial):
            if target is not None:
                target.resume_reading()

    def transport_stats(self) -> dict[str, Any]:
        """Stats of the transport itself, merged into the channel's: the serial port's (state, opens,
        losses...) under ``serial``, and TLS clients refused (named as the hl7 kind names them)."""
        extra: dict[str, Any] = {}
        if self._serial is not None:
            extra["serial"] = self._serial.stats()
        tls = self._listener.tls if self._listener is not None else None
        if tls is not None:
            extra["tls_clients_refused"] = tls.refused
        return extra
