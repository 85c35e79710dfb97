"""Serial ports (RS-232, USB adapters) as device lines for the ASTM and byte-stream kinds.

Theory of operation
-------------------
Endpoints name the device by path, Medplum style: ``serial:///dev/ttyUSB0?baud=9600`` and
``astm+serial:///dev/ttyS0?baud=9600&dataBits=8&parity=N&stopBits=1`` (Windows: ``serial://COM3``).
:func:`serial_settings` validates the line settings with clear errors (the endpoint parser's
value parsers, so every error names the URL and the parameter).

:class:`SerialPortLine` is one open port as a :class:`~medagent.channels.stream_listener.Line`
feeding one handler, with the same callbacks as a TCP connection. pyserial opens and configures
the port (termios: speed, data bits, parity, stop bits, raw mode, exclusive lock); the event
loop then watches the file descriptor (``loop.add_reader`` / ``add_writer``) and reads and writes
it non-blocking with ``os.read`` / ``os.write``.

Why this bridge, not pyserial-asyncio-fast and not a thread: on POSIX, pyserial-asyncio(-fast)
does exactly this (add_reader on the fd) behind a transport API we would have to adapt again,
and it is one more dependency; a reader thread per port costs a thread, a wake-up and a GIL
hand-off per chunk, and makes close/unplug races harder (a thread blocked in read). Watching the
fd keeps everything on the loop thread (uvloop included), so the ASTM core's timers and the
port's data are handled in one place, in order. Windows serial handles cannot be watched by a
selector: there this module refuses to start (stated in docs/channels-lab.md).

Vanishing ports: a USB adapter unplugged (read returns EOF or EIO/ENXIO), a pty whose master
closed, or an open that fails: the line reports ``line_lost`` to its handler, closes the port
and reopens it with exponential backoff (``reopenMinMs`` 100 ms doubling to ``reopenMaxMs``
30 s), forever, until the channel stops. State and counters are in :meth:`SerialPortLine.stats`.

Invariants
----------
* At most one handler per open; ``line_lost`` once per ``line_made``.
* After :meth:`SerialPortLine.stop`: no reader, writer, timer or open port is left.
* Bytes written while the port is closed are dropped and counted (a serial line has no buffer
  across an unplug: the protocol above retries, e.g. ASTM frames).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from medagent.channels.endpoint import Endpoint, EndpointError, int_param
from medagent.channels.stream_listener import LineHandler

__all__ = [
    "SERIAL_PARAMETERS",
    "SerialPortLine",
    "SerialSettings",
    "device_path",
    "serial_settings",
]

logger = logging.getLogger(__name__)

#: Query parameters of a serial endpoint (``baudRate`` is Medplum's serialport.ts name).
SERIAL_PARAMETERS: tuple[str, ...] = ("baud", "baudRate", "dataBits", "parity", "stopBits",
                                      "reopenMinMs", "reopenMaxMs")

_PARITIES = {"n": "N", "none": "N", "e": "E", "even": "E", "o": "O", "odd": "O",
             "m": "M", "mark": "M", "s": "S", "space": "S"}
_STOP_BITS = {"1": 1.0, "1.5": 1.5, "2": 2.0}


@dataclass(frozen=True, slots=True)
class SerialSettings:
    device: str
    baud: int = 9600
    data_bits: int = 8
    parity: str = "N"
    stop_bits: float = 1.0
    reopen_min_s: float = 0.1
    reopen_max_s: float = 30.0


def device_path(endpoint: Endpoint) -> str:
    """The device of a path-addressed endpoint: ``/dev/ttyUSB0`` or ``COM3``."""
    path = getattr(endpoint, "path", "") or ""
    if not path and not endpoint.host:
        parts = urlsplit(endpoint.url)
        path = parts.path
        host = parts.netloc
    else:
        host = endpoint.host
    device = path if path not in ("", "/") else host
    if not device:
        raise EndpointError(endpoint.url, None, f"the device is missing (e.g. {endpoint.scheme}:///dev/ttyUSB0)")
    return device


def serial_settings(endpoint: Endpoint) -> SerialSettings:
    """Validated line settings of a serial endpoint (EndpointError names the parameter)."""
    params = endpoint.params
    if "baud" in params and "baudRate" in params:
        raise EndpointError(endpoint.url, "baudRate", "give baud or baudRate, not both")
    baud_name = "baudRate" if "baudRate" in params else "baud"
    baud = int_param(endpoint, baud_name, 9600, 50)
    if baud > 4_000_000:
        raise EndpointError(endpoint.url, baud_name, f"{baud} is above 4000000")
    data_bits = int_param(endpoint, "dataBits", 8, 5)
    if data_bits > 8:
        raise EndpointError(endpoint.url, "dataBits", f"{data_bits} is not 5, 6, 7 or 8")
    parity_raw = params.get("parity", "N")
    parity = _PARITIES.get(parity_raw.lower())
    if parity is None:
        raise EndpointError(endpoint.url, "parity", f"{parity_raw!r} is not one of N, E, O, M, S "
                                                    "(none, even, odd, mark, space)")
    stop_raw = params.get("stopBits", "1")
    stop_bits = _STOP_BITS.get(stop_raw)
    if stop_bits is None:
        raise EndpointError(endpoint.url, "stopBits", f"{stop_raw!r} is not 1, 1.5 or 2")
    reopen_min = int_param(endpoint, "reopenMinMs", 100, 1) / 1000
    reopen_max = int_param(endpoint, "reopenMaxMs", 30_000, 1) / 1000
    if reopen_max < reopen_min:
        raise EndpointError(endpoint.url, "reopenMaxMs", "is below reopenMinMs")
    return SerialSettings(device=device_path(endpoint), baud=baud, data_bits=data_bits, parity=parity,
                          stop_bits=stop_bits, reopen_min_s=reopen_min, reopen_max_s=reopen_max)


class SerialPortLine:
    """One serial port as a self-reopening device line (see the module docstring)."""

    def __init__(self, channel: str, kind: str, settings: SerialSettings,
                 handler_factory: Callable[[], LineHandler]) -> None:
        self.channel = channel
        self.kind = kind
        self.settings = settings
        self.remote = settings.device
        self.handler_factory = handler_factory
        self.state = "stopped"
        self.opens = 0
        self.open_failures = 0
        self.losses = 0
        self.bytes_dropped = 0
        self.last_error = ""
        self._serial: Any = None
        self._fd = -1
        self._handler: LineHandler | None = None
        self._out = bytearray()
        self._reopen: asyncio.TimerHandle | None = None
        self._delay = settings.reopen_min_s
        self._paused = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if sys.platform == "win32":
            raise OSError(errno.ENOTSUP, f"{self.kind} channel {self.channel}: serial ports need a POSIX system "
                                         "in this version")
        self._loop = asyncio.get_running_loop()
        self.state = "opening"
        self._try_open()

    async def stop(self) -> None:
        self.state = "stopped"
        if self._reopen is not None:
            self._reopen.cancel()
            self._reopen = None
        self._close_port(None, reopen=False)

    def _try_open(self) -> None:
        self._reopen = None
        if self.state == "stopped":
            return
        import serial  # type: ignore[import-untyped]  # pyserial: only agents with serial channels import it

        s = self.settings
        try:
            port = serial.Serial(
                port=s.device, baudrate=s.baud, bytesize=s.data_bits, parity=s.parity,
                stopbits=s.stop_bits, timeout=0, write_timeout=0, exclusive=True,
            )
        except (OSError, ValueError, serial.SerialException) as exc:
            self.open_failures += 1
            self.last_error = str(exc)
            level = logging.WARNING if self.open_failures == 1 or self.state == "opening" else logging.DEBUG
            logger.log(level, "%s channel %s: cannot open %s (%s); retrying in %.1f s", self.kind, self.channel,
                       s.device, exc, self._delay)
            self.state = "reopening"
            self._schedule_reopen()
            return
        self._serial = port
        self._fd = port.fileno()
        os.set_blocking(self._fd, False)
        self.opens += 1
        self.state = "open"
        self._delay = self.settings.reopen_min_s
        assert self._loop is not None
        if not self._paused:
            self._loop.add_reader(self._fd, self._readable)
        logger.info("%s channel %s: %s open (%d baud %d%s%g)", self.kind, self.channel, s.device, s.baud,
                    s.data_bits, s.parity, s.stop_bits)
        self._handler = self.handler_factory()
        self._handler.line_made(self)

    def _schedule_reopen(self) -> None:
        assert self._loop is not None
        self._reopen = self._loop.call_later(self._delay, self._try_open)
        self._delay = min(self._delay * 2, self.settings.reopen_max_s)

    def _close_port(self, exc: Exception | None, *, reopen: bool) -> None:
        port, self._serial = self._serial, None
        if port is None:
            return
        loop = self._loop
        if loop is not None and self._fd >= 0:
            loop.remove_reader(self._fd)
            loop.remove_writer(self._fd)
        self._fd = -1
        self._out.clear()
        try:
            port.close()
        except (OSError, ValueError):
            pass
        handler, self._handler = self._handler, None
        if handler is not None:
            handler.line_lost(exc)
        if reopen and self.state != "stopped":
            self.losses += 1
            self.last_error = str(exc) if exc else "end of file"
            logger.warning("%s channel %s: %s lost (%s); reopening", self.kind, self.channel,
                           self.settings.device, self.last_error)
            self.state = "reopening"
            self._schedule_reopen()

    # ------------------------------------------------------------------ I/O

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: pty master closed / USB adapter gone
            self._close_port(exc, reopen=True)
            return
        if not data:
            self._close_port(None, reopen=True)
            return
        if self._handler is not None:
            self._handler.data_received(data)

    def write(self, data: bytes) -> None:
        if self._serial is None:
            self.bytes_dropped += len(data)
            return
        if self._out:
            self._out += data
            return
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self._close_port(exc, reopen=True)
            return
        if written < len(data):
            self._out += data[written:]
            assert self._loop is not None
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        try:
            written = os.write(self._fd, self._out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close_port(exc, reopen=True)
            return
        del self._out[:written]
        if not self._out and self._loop is not None:
            self._loop.remove_writer(self._fd)

    def close(self) -> None:
        """Close the port now (a protocol decided so); it is reopened like a lost port."""
        self._close_port(None, reopen=True)

    def pause_reading(self) -> None:
        self._paused = True
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        self._paused = False
        if self._loop is not None and self._fd >= 0:
            self._loop.add_reader(self._fd, self._readable)

    def stats(self) -> dict[str, Any]:
        return {"device": self.settings.device, "state": self.state, "opens": self.opens,
                "openFailures": self.open_failures, "losses": self.losses, "bytesDropped": self.bytes_dropped,
                "lastError": self.last_error}
