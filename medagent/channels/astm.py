"""ASTM E1381/E1394 channels: ``astm://host:port`` (TCP) and ``astm+serial:///dev/tty...``.

Theory of operation
-------------------
Each device line (an accepted TCP connection, or the serial port) gets an :class:`AstmSession`
that drives one :class:`~medagent.proto.astm.AstmLink` (the computer-system role: it yields on
contention, LIS01-A2 §6.2.7). The session feeds it bytes and the loop's clock, writes its
:class:`~medagent.proto.astm.Write` events, keeps one timer armed at ``link.deadline`` and turns
its other events into actions:

* ``MessageReceived`` -> one :class:`~medagent.records.InboundRecord` (content type
  ``x-application/astm-e1394``, body = the records one per line, sender = H.5, control id =
  H.3) handed to the sink with ``durable=True`` and the queue's DROP dedup (an instrument that
  resends a message whose final ACK it missed does not create a second row). The commit
  callback answers the link: ok -> the final frame's ACK; a storage error -> NAK (the
  instrument retransmits). So an instrument is told "accepted" only for a stored message.
* ``SendResult`` -> completes the outbound future of :meth:`AstmChannel.send_to`.
* ``Notice`` -> counters (``linkEvents`` in stats) and one log line for the serious ones.

Outbound (host -> instrument: orders, host-query answers, LIS02-A2 §6): the hub's message goes
to a connected instrument with :meth:`AstmChannel.send_to` (the channel takes the sender role
on that line and contends correctly). Hub pushes arrive through the ``astm`` / ``astm+serial``
:class:`~medagent.channels.base.OutboundSender` (:class:`AstmOutboundSender`): a push to
``astm://ip:port`` naming a connected instrument (the ``remote`` of its own transmits), or to
``astm+serial:///dev/ttyUSB0``, goes out on that line; a push to any other ``astm://host:port``
connects to an instrument that listens itself, sends, and disconnects. Both report the link's outcome: a
:class:`~medagent.channels.base.OutboundReply` on success, :class:`AstmSendError` with the
reason (NAKed 6 times, no answer, busy, connection lost) on failure.

Parameters (all optional; timers in ms, defaults from LIS01-A2 §6.5.1): ``encoding`` (utf-8;
the body's text encoding on the websocket and of outbound messages), ``maxFrameSize`` (65536),
``maxMessageSize`` (8 MiB), ``establishmentTimeoutMs`` (15000), ``replyTimeoutMs`` (15000),
``frameTimeoutMs`` (30000), ``busyRetryMs`` (10000), ``contentionRetryMs`` (20000),
``maxAttempts`` (6), ``deliverIncomplete`` (false), ``maxConnections`` (100, TCP),
``sendTimeoutMs`` (120000, the whole outbound send); serial endpoints add the line settings
of :mod:`medagent.channels.serialport`.

Invariants
----------
* No ACK of a message's final frame before its commit succeeded.
* Every session's timer and line are gone after :meth:`AstmChannel.stop`; pending outbound
  sends fail with "channel stopped".
* Record text is never logged unless ``log_phi``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final, cast
from urllib.parse import parse_qsl, urlsplit

from medagent.channels.base import (
    ChannelContext,
    ChannelKind,
    ChannelStats,
    InboundSink,
    OutboundReply,
    base_stats,
    observe_latency,
    register_kind,
    register_outbound_sender,
)
from medagent.channels.endpoint import (
    Endpoint,
    EndpointError,
    bool_param,
    encoding_param,
    int_param,
)
from medagent.channels.line_source import LineSource
from medagent.channels.serialport import (
    SERIAL_PARAMETERS,
    SerialSettings,
    serial_settings,
)
from medagent.channels.stream_listener import Line
from medagent.channels.tls import TLS_LISTENER_PARAMETERS, checking_tls
from medagent.proto import astm as core
from medagent.records import ASTM_CONTENT_TYPE, DuplicatePolicy, InboundRecord

__all__ = [
    "ASTM_KIND",
    "ASTM_PARAMETERS",
    "ASTM_SERIAL_KIND",
    "AstmChannel",
    "AstmOptions",
    "AstmOutboundSender",
    "AstmSendError",
    "AstmSession",
    "astm_options",
]

logger = logging.getLogger(__name__)

ASTM_PARAMETERS: tuple[str, ...] = (
    "encoding", "maxFrameSize", "maxMessageSize", "establishmentTimeoutMs", "replyTimeoutMs",
    "frameTimeoutMs", "busyRetryMs", "contentionRetryMs", "maxAttempts", "deliverIncomplete",
    "maxConnections", "sendTimeoutMs",
)
#: Notices worth a log line at WARNING (the others are counted and logged at DEBUG).
_SERIOUS = frozenset({"abort", "timeout", "commit-timeout", "commit-failed", "oversize"})


class AstmSendError(Exception):
    """An outbound ASTM message was not accepted by the instrument; the text is the reason."""


@dataclass(frozen=True, slots=True)
class AstmOptions:
    encoding: str = "utf-8"
    timers: core.AstmTimers = field(default_factory=core.AstmTimers)
    max_frame_size: int = 64 * 1024
    max_message_size: int = 8 * 1024 * 1024
    max_attempts: int = 6
    deliver_incomplete: bool = False
    max_connections: int = 100
    send_timeout_s: float = 120.0
    serial: SerialSettings | None = None


def _ms(endpoint: Endpoint, name: str, default_s: float) -> float:
    return int_param(endpoint, name, int(default_s * 1000), 1) / 1000


def astm_options(endpoint: Endpoint) -> AstmOptions:
    """Typed options of an ``astm://`` or ``astm+serial://`` endpoint (EndpointError)."""
    if endpoint.scheme not in ("astm", "astm+serial"):
        raise EndpointError(endpoint.url, None, f"expected astm:// or astm+serial://, got {endpoint.scheme}://")
    d = core.AstmTimers()
    timers = core.AstmTimers(
        establishment=_ms(endpoint, "establishmentTimeoutMs", d.establishment),
        reply=_ms(endpoint, "replyTimeoutMs", d.reply),
        frame=_ms(endpoint, "frameTimeoutMs", d.frame),
        busy_retry=_ms(endpoint, "busyRetryMs", d.busy_retry),
        contention_retry=_ms(endpoint, "contentionRetryMs", d.contention_retry),
    )
    defaults = AstmOptions()
    return AstmOptions(
        encoding=encoding_param(endpoint),
        timers=timers,
        max_frame_size=int_param(endpoint, "maxFrameSize", defaults.max_frame_size, 16),
        max_message_size=int_param(endpoint, "maxMessageSize", defaults.max_message_size, 16),
        max_attempts=int_param(endpoint, "maxAttempts", defaults.max_attempts, 1),
        deliver_incomplete=bool_param(endpoint, "deliverIncomplete", False),
        max_connections=int_param(endpoint, "maxConnections", defaults.max_connections, 1),
        send_timeout_s=_ms(endpoint, "sendTimeoutMs", defaults.send_timeout_s),
        serial=serial_settings(endpoint) if endpoint.scheme == "astm+serial" else None,
    )


class _Counters:
    def __init__(self) -> None:
        self.stats = ChannelStats()
        self.notices: Counter[str] = Counter()
        self.discarded = 0
        self.sends_failed = 0
        self.noise_bytes = 0


class AstmSession:
    """One device line driven by an E1381 link (a LineHandler; see the module docstring)."""

    def __init__(self, channel: AstmChannel | None, name: str, options: AstmOptions, *,
                 sink: InboundSink | None, counters: _Counters, log_phi: bool = False) -> None:
        self.channel = channel
        self.name = name
        self.options = options
        self.sink = sink
        self.counters = counters
        self.log_phi = log_phi
        self.link = core.AstmLink(timers=options.timers, max_frame_size=options.max_frame_size,
                                  max_message_size=options.max_message_size, max_attempts=options.max_attempts,
                                  deliver_incomplete=options.deliver_incomplete)
        self.line: Line | None = None
        self.remote = "?"
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._sends: dict[int, asyncio.Future[core.SendResult]] = {}
        self._received_at: dict[int, float] = {}
        self._noise_seen = 0

    # ------------------------------------------------------------------ LineHandler

    def line_made(self, line: Line) -> None:
        self.line = line
        self.remote = line.remote
        self.counters.stats.connections_open += 1
        self.counters.stats.connections_total += 1
        if self.channel is not None:
            self.channel.sessions[self.remote] = self

    def data_received(self, data: bytes) -> None:
        self.counters.stats.bytes_in += len(data)
        self._apply(self.link.feed(data, self._loop.time()))

    def line_lost(self, exc: Exception | None) -> None:
        if self.line is None:
            return  # already lost (stop() and the transport's own callback both report it)
        self.counters.stats.connections_open -= 1
        if self.channel is not None and self.channel.sessions.get(self.remote) is self:
            del self.channel.sessions[self.remote]
        self.line = None
        self._apply(self.link.connection_lost(self._loop.time()))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------ outbound

    async def send(self, text: bytes, timeout: float) -> core.SendResult:
        """Send one E1394 message on this line (sender role); returns the link's outcome."""
        if self.line is None:
            return core.SendResult(0, False, "connection lost")
        message_id, events = self.link.send(text, self._loop.time())
        future: asyncio.Future[core.SendResult] = self._loop.create_future()
        self._sends[message_id] = future
        self._apply(events)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            # withdraw it, so a message reported as failed is never delivered later
            self._sends.pop(message_id, None)
            self._apply(self.link.cancel(message_id, self._loop.time()))
            return core.SendResult(message_id, False, f"not sent within {timeout:g} s")
        finally:
            self._sends.pop(message_id, None)

    # ------------------------------------------------------------------ the link's events

    def _apply(self, events: list[core.Event]) -> None:
        counters = self.counters
        for event in events:
            if isinstance(event, core.Write):
                self._write(event.data)
            elif isinstance(event, core.MessageReceived):
                self._received(event)
            elif isinstance(event, core.SendResult):
                self._send_done(event)
            elif isinstance(event, core.MessageDiscarded):
                counters.discarded += 1
                logger.warning("astm channel %s: %s: incomplete message of %d record(s) discarded (%s)",
                               self.name, self.remote, event.records, event.reason)
            elif isinstance(event, core.Notice):
                counters.notices[event.kind] += 1
                level = logging.WARNING if event.kind in _SERIOUS else logging.DEBUG
                logger.log(level, "astm channel %s: %s: %s %s", self.name, self.remote, event.kind, event.detail)
        noise = self.link.noise_bytes - self._noise_seen
        if noise:
            counters.noise_bytes += noise
            self._noise_seen = self.link.noise_bytes
        self._arm_timer()

    def _write(self, data: bytes) -> None:
        if self.line is None:
            return
        self.counters.stats.bytes_out += len(data)
        self.line.write(data)

    def _arm_timer(self) -> None:
        """Keep one timer at or before the link's deadline.

        The deadline moves later with every frame; an armed timer that is earlier is kept (when
        it fires early the link does nothing and it is re-armed), so a busy line costs one timer
        per frame-timer period, not one per frame.
        """
        deadline = self.link.deadline
        timer = self._timer
        if deadline is None or self.line is None:
            return  # an armed timer fires harmlessly (the link ignores early calls)
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._apply(self.link.on_timer(self._loop.time()))

    def _received(self, event: core.MessageReceived) -> None:
        stats = self.counters.stats
        stats.units_in += 1
        lines = event.body.split(b"\n")
        # identity from the H record only (the whole message is parsed by the bot, not here)
        sender, control_id = core.header_identity(core.parse_records(lines[0], self.options.encoding))
        types = "".join(dict.fromkeys(chr(line[0]).upper() for line in lines if line))
        record = InboundRecord(
            channel=self.name, remote=self.remote, sender=sender, control_id=control_id,
            message_type=f"ASTM^{types}", body=event.body, received_at=time.time(),
            content_type=ASTM_CONTENT_TYPE,
        )
        if self.log_phi:
            logger.info("astm channel %s: %s: message %r", self.name, self.remote, event.body)
        logger.debug("astm channel %s: %s: message of %d record(s), %d bytes", self.name, self.remote,
                     event.records, len(event.body))
        if self.sink is None:
            return
        if not event.complete:  # deliver_incomplete: the session is over, nothing to answer
            self.sink.accept(record, durable=True, dedup=DuplicatePolicy.DROP, on_commit=lambda result: None)
            return
        self._received_at[event.token] = self._loop.time()
        token = event.token
        self.sink.accept(record, durable=True, dedup=DuplicatePolicy.DROP,
                         on_commit=lambda result: self._committed(token, result.ok, result.error))

    def _committed(self, token: int, ok: bool, error: str | None) -> None:
        stats = self.counters.stats
        started = self._received_at.pop(token, None)
        if not ok:
            stats.errors += 1
            logger.error("astm channel %s: %s: message not stored (%s); NAK", self.name, self.remote, error)
        if self.line is None:
            return
        events = self.link.commit_done(token, ok, self._loop.time())
        if any(isinstance(e, core.Write) for e in events):
            code = "ACK" if ok else "NAK"
            stats.answers[code] = stats.answers.get(code, 0) + 1
            if started is not None:
                observe_latency(stats, (self._loop.time() - started) * 1000)
        self._apply(events)

    def _send_done(self, event: core.SendResult) -> None:
        if event.ok:
            self.counters.stats.units_out += 1
        else:
            self.counters.sends_failed += 1
            logger.warning("astm channel %s: %s: outbound message failed: %s", self.name, self.remote, event.reason)
        future = self._sends.get(event.message_id)
        if future is not None and not future.done():
            future.set_result(event)

    def close(self) -> None:
        if self.line is not None:
            self.line.close()


class AstmChannel:
    """An ASTM channel over TCP (listener) or a serial port: the ``astm`` kinds' Channel."""

    def __init__(self, name: str, endpoint: Endpoint, options: AstmOptions, context: ChannelContext) -> None:
        self.name = name
        self.endpoint = endpoint
        self.options = options
        self.context = context
        self.sessions: dict[str, AstmSession] = {}
        self.counters = _Counters()
        self.lines = LineSource(name, endpoint.scheme, "astm", endpoint, options.serial, self._new_session,
                                options.max_connections)

    @property
    def kind(self) -> str:
        return self.endpoint.scheme

    @property
    def wants_replies(self) -> bool:
        return False  # the link answer is the commit; bot replies never go back on the link

    @property
    def encoding(self) -> str:
        return self.options.encoding

    @property
    def host(self) -> str:
        return self.lines.host

    @property
    def port(self) -> int:
        return self.lines.port

    def _new_session(self) -> AstmSession:
        return AstmSession(self, self.name, self.options, sink=self.context.sink, counters=self.counters,
                           log_phi=self.context.log_phi)

    async def start(self, sock: socket.socket | None = None) -> None:
        await self.lines.start(sock)
        _LIVE_CHANNELS.add(self)

    async def stop(self, drain_timeout: float = 5.0) -> None:
        # Messages awaiting their commit are answered when it lands (within the drain time).
        _LIVE_CHANNELS.discard(self)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while any(s.link.state is core.LinkState.COMMITTING for s in self.sessions.values()) \
                and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self.lines.stop()
        for session in list(self.sessions.values()):
            session.line_lost(None)

    def listening_sockets(self) -> list[socket.socket]:
        return self.lines.listening_sockets()

    def deliver_reply(self, remote: str, control_id: str, body: str, status_code: int = 200) -> bool:
        return False  # bot replies are not written to an ASTM link (orders go through send_to)

    def pause_reading(self) -> None:
        self.lines.pause_reading()

    def resume_reading(self) -> None:
        self.lines.resume_reading()

    async def send_to(self, remote: str, body: str, content_type: str = ASTM_CONTENT_TYPE, *,
                      timeout: float | None = None) -> OutboundReply:
        """Send an E1394 message to a connected instrument (``remote`` "ip:port" or the device;
        empty = the only line). Raises AstmSendError with the reason on failure."""
        session = self.sessions.get(remote)
        if session is None and not remote and len(self.sessions) == 1:
            session = next(iter(self.sessions.values()))
        if session is None:
            raise AstmSendError(f"astm channel {self.name}: no instrument connected as {remote or '(any)'}")
        result = await session.send(_encode(body, self.options.encoding),
                                    timeout if timeout is not None else self.options.send_timeout_s)
        if not result.ok:
            raise AstmSendError(result.reason)
        return OutboundReply(body="ACK", content_type="text/plain", status_code=200)

    def stats(self) -> dict[str, Any]:
        counters = self.counters
        shared = counters.stats
        shared.errors = counters.discarded + counters.sends_failed + sum(
            counters.notices[k] for k in _SERIOUS)
        extra: dict[str, Any] = {"linkEvents": dict(counters.notices), "discardedMessages": counters.discarded,
                                 "sendsFailed": counters.sends_failed, "noiseBytes": counters.noise_bytes}
        extra.update(self.lines.transport_stats())
        return base_stats(self.kind, shared, extra)


# --------------------------------------------------------------------------- outbound sender


#: Running ASTM channels, so a hub push can reach an instrument connected to one of them.
_LIVE_CHANNELS: set[AstmChannel] = set()


def _connected_line(remote: str) -> tuple[AstmChannel, str] | None:
    """The running channel holding the line named by a push's remote, if any.

    ``astm://ip:port`` names an instrument *connected to us* when a session has that remote (the
    ``remote`` of the instrument's own transmits); ``astm+serial:///dev/ttyUSB0`` names a
    serial channel's port.
    """
    parts = urlsplit(remote)
    key = parts.path if parts.scheme == "astm+serial" else parts.netloc
    for channel in _LIVE_CHANNELS:
        if key in channel.sessions:
            return channel, key
    return None


def _encode(body: str, encoding: str) -> bytes:
    """An outbound message's bytes; a text the instrument's encoding cannot carry is refused."""
    try:
        return body.encode(encoding)
    except (UnicodeEncodeError, LookupError) as exc:
        raise AstmSendError(f"the message cannot be encoded as {encoding}: {exc}") from None


class AstmOutboundSender:
    """Hub pushes to ``astm://host:port`` or ``astm+serial:///dev/...``.

    The line of a running channel is used when it matches (an instrument connected to an
    ``astm://`` listener, named by its ``ip:port``; a serial channel's device); otherwise, for
    ``astm://``, the sender connects to an instrument that listens, sends, and disconnects.
    """

    def __init__(self, **_settings: Any) -> None:
        self._options = AstmOptions()

    async def send(self, remote: str, body: str, content_type: str, *, return_ack: str | None = None,
                   timeout: float | None = None) -> OutboundReply:
        connected = _connected_line(remote)
        if connected is not None:
            channel, key = connected
            return await channel.send_to(key, body, content_type, timeout=timeout)
        parts = urlsplit(remote)
        if parts.scheme == "astm+serial":
            raise AstmSendError(f"no running astm+serial channel has the port {parts.path!r}")
        if parts.scheme != "astm" or not parts.hostname or not parts.port:
            raise AstmSendError(f"{remote!r} is not an astm://host:port address")
        query = dict(parse_qsl(parts.query))
        unknown = sorted(set(query) - {"encoding"})
        if unknown:
            raise AstmSendError(f"{remote!r}: unknown parameter {unknown[0]!r} (accepted: encoding)")
        encoding = query.get("encoding", self._options.encoding)
        data = _encode(body, encoding)
        loop = asyncio.get_running_loop()
        counters = _Counters()
        session_box: list[AstmSession] = []

        def factory() -> _ClientLine:
            session = AstmSession(None, "outbound", self._options, sink=None, counters=counters)
            session_box.append(session)
            return _ClientLine(session)

        try:
            transport, _line = await asyncio.wait_for(
                loop.create_connection(factory, parts.hostname, parts.port), timeout or 15.0)
        except (OSError, TimeoutError) as exc:
            raise AstmSendError(f"cannot connect to {parts.hostname}:{parts.port}: {exc}") from exc
        try:
            result = await session_box[0].send(data, timeout or 120.0)
        finally:
            transport.close()
        if not result.ok:
            raise AstmSendError(result.reason)
        return OutboundReply(body="ACK", content_type="text/plain", status_code=200)

    async def close(self) -> None:
        return None


class _ClientLine(asyncio.Protocol):
    """An outbound TCP connection as a Line for one AstmSession."""

    def __init__(self, session: AstmSession) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.remote = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        peer = transport.get_extra_info("peername")
        self.remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.session.line_made(self)

    def data_received(self, data: bytes) -> None:
        self.session.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.line_lost(exc)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


# --------------------------------------------------------------------------- registration


def _create(name: str, endpoint: Endpoint, options: AstmOptions, context: ChannelContext) -> AstmChannel:
    return AstmChannel(name, endpoint, options, context)


ASTM_KIND: Final = register_kind(ChannelKind(
    scheme="astm", parameters=ASTM_PARAMETERS + TLS_LISTENER_PARAMETERS, parse_options=checking_tls(astm_options),
    create=_create,
    description="ASTM E1381/E1394 (CLSI LIS01-A2/LIS02-A2) over TCP: checksums, NAK, commit before final ACK",
))
ASTM_SERIAL_KIND: Final = register_kind(ChannelKind(
    scheme="astm+serial", parameters=ASTM_PARAMETERS + SERIAL_PARAMETERS, parse_options=astm_options,
    create=_create, needs_port=False,
    description="ASTM E1381/E1394 over a serial port (pyserial)",
))
register_outbound_sender("astm", AstmOutboundSender)
register_outbound_sender("astm+serial", AstmOutboundSender)
