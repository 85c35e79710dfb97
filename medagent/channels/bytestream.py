"""Byte-stream channels: ``tcp://host:port?startChar=..&endChar=..`` and ``serial:///dev/tty...``.

Theory of operation
-------------------
Medplum's generic byte-stream channel (``bytestream.ts``, shared/medplum-next-waves.md §3.1),
with the same parameters and semantics, over TCP or a serial port. Each line (an accepted
connection, or the port) gets a :class:`ByteStreamSession` with its own
:class:`~medagent.proto.bytestream.ByteStreamFramer`: autoRespond answers are written the moment
their pattern completes, and every frame (start char .. end char inclusive, filtered by
``stripSequence`` / ``stripControlChars`` / ``keepControlChars``) becomes one
:class:`~medagent.records.InboundRecord` with content type ``application/octet-stream`` whose
body is the frame's bytes. The transmit's text is those bytes as ``bodyEncoding`` says
(``hex``, Medplum's default, or ``utf-8``): :attr:`ByteStreamChannel.encoding` tells the runtime.

Unlike Medplum, the frame goes through the durable queue (no answer depends on the commit:
byte streams have no ACK beyond autoRespond, which is a link-level reflex, so a storage error is
logged and counted, not answered) and a frame is capped at ``maxFrameSize`` (default 16 MiB, the
team-wide frame limit;
an oversize frame is dropped, logged and counted, and the stream resynchronises at the next
start char).

Bot replies: a bot's response to a frame is written back to the line it came from
(Medplum's ``sendToRemote``: ``Buffer.from(body, bodyEncoding)``), unless ``ignoreResponse=true``
(Medplum's documented ASTM workaround setting). A reply for a line that is gone is dropped
(``deliver_reply`` returns False, counted).

Parameters: ``startChar``, ``endChar`` (required, one character each, the byte value of its code
point, URL-encoded: ``%02``), ``autoRespond=<pattern>:<response>[,...]``, ``stripSequence=<seq>[,...]``,
``stripControlChars`` (false), ``keepControlChars`` (bytes exempt from it), ``bodyEncoding``
(``hex`` | ``utf-8``), ``ignoreResponse`` (false), ``maxFrameSize`` (16777216), ``maxConnections``
(100, TCP); serial endpoints add the line settings of :mod:`medagent.channels.serialport`.
Medplum ignores a malformed entry with a warning; medagent refuses the URL (EndpointError names
the parameter), like every other kind. ``,`` and ``:`` cannot occur in a sequence (Medplum's
rule); bytes >= 0x80 are written UTF-8-encoded (``%C3%A9`` is the byte 0xE9).

Invariants
----------
* One framer per line: one line's bytes never complete another's pattern or frame.
* Frame bytes are never logged unless ``log_phi``.
* Every line and timer is gone after :meth:`ByteStreamChannel.stop`.
"""

from __future__ import annotations

import binascii
import enum
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Final

from medagent.channels.base import (
    ChannelContext,
    ChannelKind,
    ChannelStats,
    base_stats,
    register_kind,
)
from medagent.channels.endpoint import Endpoint, EndpointError, bool_param, choice_param, int_param
from medagent.channels.line_source import LineSource
from medagent.channels.serialport import (
    SERIAL_PARAMETERS,
    SerialSettings,
    serial_settings,
)
from medagent.channels.stream_listener import Line
from medagent.channels.tls import TLS_LISTENER_PARAMETERS, checking_tls
from medagent.proto.bytestream import (
    AutoRespondRule,
    ByteStreamConfig,
    ByteStreamFramer,
    Frame,
    FrameTooLarge,
    Respond,
)
from medagent.records import OCTET_STREAM_CONTENT_TYPE, CommitResult, DuplicatePolicy, InboundRecord

__all__ = [
    "BYTESTREAM_PARAMETERS",
    "SERIAL_KIND",
    "TCP_KIND",
    "BodyEncoding",
    "ByteStreamChannel",
    "ByteStreamOptions",
    "ByteStreamSession",
    "bytestream_options",
]

logger = logging.getLogger(__name__)

BYTESTREAM_PARAMETERS: tuple[str, ...] = (
    # Medplum's (bytestream.ts, newest)
    "startChar", "endChar", "autoRespond", "stripSequence", "stripControlChars", "keepControlChars",
    "bodyEncoding", "ignoreResponse",
    # medagent's
    "maxFrameSize", "maxConnections",
)


class BodyEncoding(enum.Enum):
    HEX = "hex"
    UTF8 = "utf-8"

    @classmethod
    def _missing_(cls, value: object) -> BodyEncoding | None:
        return cls.UTF8 if isinstance(value, str) and value.lower() == "utf8" else None


@dataclass(frozen=True, slots=True)
class ByteStreamOptions:
    framing: ByteStreamConfig
    body_encoding: BodyEncoding = BodyEncoding.HEX
    ignore_response: bool = False
    max_connections: int = 100
    serial: SerialSettings | None = None


def _byte_sequence(endpoint: Endpoint, name: str, text: str) -> bytes:
    if not text:
        raise EndpointError(endpoint.url, name, "an empty byte sequence")
    if any(ord(char) > 0xFF for char in text):
        raise EndpointError(endpoint.url, name, f"{text!r} is not a byte sequence; write bytes >= 0x80 "
                                                "as their UTF-8 encoding, e.g. %C3%A9 for 0xE9")
    return text.encode("latin-1")


def _entries(endpoint: Endpoint, name: str) -> list[str]:
    raw = endpoint.params.get(name)
    return [] if raw is None else raw.split(",")


def _framing_char(endpoint: Endpoint, name: str) -> int:
    raw = endpoint.params.get(name)
    if raw is None:
        raise EndpointError(endpoint.url, name, "required (URL-encode control characters, e.g. %02)")
    if len(raw) != 1 or ord(raw) > 0xFF:
        raise EndpointError(endpoint.url, name, f"{raw!r} is not a single character with a byte value (0-255)")
    return ord(raw)


def _auto_respond(endpoint: Endpoint) -> tuple[AutoRespondRule, ...]:
    rules: list[AutoRespondRule] = []
    for entry in _entries(endpoint, "autoRespond"):
        pattern, sep, response = entry.partition(":")
        if not sep:
            raise EndpointError(endpoint.url, "autoRespond", f"{entry!r} is not <pattern>:<response>")
        rule = AutoRespondRule(_byte_sequence(endpoint, "autoRespond", pattern),
                               _byte_sequence(endpoint, "autoRespond", response))
        if any(existing.pattern == rule.pattern for existing in rules):
            raise EndpointError(endpoint.url, "autoRespond", f"pattern {pattern!r} given twice")
        rules.append(rule)
    return tuple(rules)


def bytestream_options(endpoint: Endpoint) -> ByteStreamOptions:
    """Typed options of a ``tcp://`` or ``serial://`` byte-stream endpoint (EndpointError)."""
    if endpoint.scheme not in ("tcp", "serial"):
        raise EndpointError(endpoint.url, None, f"expected tcp:// or serial://, got {endpoint.scheme}://")
    start, end = _framing_char(endpoint, "startChar"), _framing_char(endpoint, "endChar")
    if start == end:
        raise EndpointError(endpoint.url, "endChar", "must differ from startChar")
    strip = tuple(dict.fromkeys(_byte_sequence(endpoint, "stripSequence", e)
                                for e in _entries(endpoint, "stripSequence")))
    keep = frozenset(b for e in _entries(endpoint, "keepControlChars")
                     for b in _byte_sequence(endpoint, "keepControlChars", e))
    strip_control = bool_param(endpoint, "stripControlChars", False)
    if keep and not strip_control:  # Medplum warns too; the URL stays usable as in Medplum
        logger.warning("endpoint %s: keepControlChars has no effect without stripControlChars=true",
                       endpoint.url)
    framing = ByteStreamConfig(
        start_byte=start, end_byte=end, auto_respond=_auto_respond(endpoint), strip_sequences=strip,
        strip_control_chars=strip_control, keep_control_chars=keep,
        max_frame_size=int_param(endpoint, "maxFrameSize", 16 * 1024 * 1024, 2),
    )
    return ByteStreamOptions(
        framing=framing,
        body_encoding=choice_param(endpoint, "bodyEncoding", BodyEncoding, BodyEncoding.HEX),
        ignore_response=bool_param(endpoint, "ignoreResponse", False),
        max_connections=int_param(endpoint, "maxConnections", 100, 1),
        serial=serial_settings(endpoint) if endpoint.scheme == "serial" else None,
    )


class ByteStreamSession:
    """One line of a byte-stream channel (a LineHandler)."""

    def __init__(self, channel: ByteStreamChannel) -> None:
        self.channel = channel
        self.framer = ByteStreamFramer(channel.options.framing)
        self.line: Line | None = None
        self.remote = "?"

    def line_made(self, line: Line) -> None:
        self.line = line
        self.remote = line.remote
        self.channel.sessions[self.remote] = self
        self.channel.shared.connections_open += 1
        self.channel.shared.connections_total += 1

    def data_received(self, data: bytes) -> None:
        channel = self.channel
        shared = channel.shared
        shared.bytes_in += len(data)
        for event in self.framer.feed(data):
            if isinstance(event, Respond):
                self.write(event.data)
                shared.answers["autoRespond"] = shared.answers.get("autoRespond", 0) + 1
            elif isinstance(event, Frame):
                channel.frame_received(self.remote, event.data)
            elif isinstance(event, FrameTooLarge):
                shared.errors += 1
                channel.frames_too_large += 1
                logger.warning("byte-stream channel %s: %s: frame over maxFrameSize=%d dropped",
                               channel.name, self.remote, event.size)

    def line_lost(self, exc: Exception | None) -> None:
        if self.line is None:
            return
        channel = self.channel
        channel.shared.connections_open -= 1
        channel.discarded_bytes += self.framer.discarded_bytes + self.framer.pending_bytes
        if channel.sessions.get(self.remote) is self:
            del channel.sessions[self.remote]
        self.line = None

    def write(self, data: bytes) -> None:
        if self.line is not None:
            self.channel.shared.bytes_out += len(data)
            self.line.write(data)


class ByteStreamChannel:
    """A byte-stream channel over TCP (listener) or a serial port: the tcp/serial kinds' Channel."""

    def __init__(self, name: str, endpoint: Endpoint, options: ByteStreamOptions, context: ChannelContext) -> None:
        self.name = name
        self.endpoint = endpoint
        self.options = options
        self.context = context
        self.sessions: dict[str, ByteStreamSession] = {}
        self.shared = ChannelStats()
        self.frames_too_large = 0
        self.discarded_bytes = 0
        self.replies_dropped = 0
        self.store_errors = 0
        self.lines = LineSource(name, endpoint.scheme, "byte-stream", endpoint, options.serial,
                                lambda: ByteStreamSession(self), options.max_connections)

    @property
    def kind(self) -> str:
        return self.endpoint.scheme

    @property
    def wants_replies(self) -> bool:
        return not self.options.ignore_response

    @property
    def encoding(self) -> str:
        """``hex`` or ``utf-8``: how the runtime turns a body into the transmit's text and back."""
        return self.options.body_encoding.value

    @property
    def port(self) -> int:
        return self.lines.port

    async def start(self, sock: socket.socket | None = None) -> None:
        await self.lines.start(sock)

    async def stop(self, drain_timeout: float = 5.0) -> None:
        await self.lines.stop()

    def listening_sockets(self) -> list[socket.socket]:
        return self.lines.listening_sockets()

    def frame_received(self, remote: str, frame: bytes) -> None:
        self.shared.units_in += 1
        if self.context.log_phi:
            logger.info("byte-stream channel %s: %s: frame %r", self.name, remote, frame)
        record = InboundRecord(channel=self.name, remote=remote, sender="", control_id="", message_type="",
                               body=frame, received_at=time.time(), content_type=OCTET_STREAM_CONTENT_TYPE)
        self.context.sink.accept(record, durable=True, dedup=DuplicatePolicy.OFF, on_commit=self._committed)

    def _committed(self, result: CommitResult) -> None:
        if not result.ok:
            self.store_errors += 1
            self.shared.errors += 1
            logger.error("byte-stream channel %s: frame not stored (%s)", self.name, result.error)

    def deliver_reply(self, remote: str, control_id: str, body: str, status_code: int = 200) -> bool:
        """Write a bot's reply to the line ``remote`` (Medplum's sendToRemote)."""
        session = self.sessions.get(remote)
        if self.options.ignore_response or session is None:
            self.replies_dropped += 1
            if session is None:
                logger.warning("byte-stream channel %s: reply dropped: %s is gone", self.name, remote)
            return False
        try:
            data = (bytes.fromhex(body) if self.options.body_encoding is BodyEncoding.HEX
                    else body.encode("utf-8"))
        except (ValueError, binascii.Error):
            self.replies_dropped += 1
            logger.warning("byte-stream channel %s: reply for %s is not hex; dropped", self.name, remote)
            return False
        session.write(data)
        self.shared.units_out += 1
        return True

    def pause_reading(self) -> None:
        self.lines.pause_reading()

    def resume_reading(self) -> None:
        self.lines.resume_reading()

    def stats(self) -> dict[str, Any]:
        discarded = self.discarded_bytes + sum(s.framer.discarded_bytes for s in self.sessions.values())
        extra: dict[str, Any] = {"framesTooLarge": self.frames_too_large, "discardedBytes": discarded,
                                 "repliesDropped": self.replies_dropped, "storeErrors": self.store_errors,
                                 "bodyEncoding": self.encoding}
        extra.update(self.lines.transport_stats())
        return base_stats(self.kind, self.shared, extra)


def _create(name: str, endpoint: Endpoint, options: ByteStreamOptions, context: ChannelContext) -> ByteStreamChannel:
    return ByteStreamChannel(name, endpoint, options, context)


TCP_KIND: Final = register_kind(ChannelKind(
    scheme="tcp", parameters=BYTESTREAM_PARAMETERS + TLS_LISTENER_PARAMETERS,
    parse_options=checking_tls(bytestream_options), create=_create,
    description="byte stream over TCP with start/end framing (Medplum's tcp:// channel)",
))
SERIAL_KIND: Final = register_kind(ChannelKind(
    scheme="serial", parameters=BYTESTREAM_PARAMETERS + SERIAL_PARAMETERS, parse_options=bytestream_options,
    create=_create, needs_port=False, description="byte stream over a serial port (pyserial)",
))
