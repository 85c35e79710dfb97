"""Inbound HL7 v2 over MLLP: the ``mllp`` channel kind (an asyncio skin over the session core).

Theory of operation
-------------------
:class:`Hl7Channel` listens on its endpoint's host:port, or on a listening socket it is handed
(``start(sock)``: reloads and upgrades keep the port without a gap). Every accepted TCP
connection gets an :class:`Hl7Connection` (a plain ``asyncio.Protocol``, not streams: this is
the hot path) with its own :class:`~medagent.proto.mllp.MllpDecoder` and
:class:`~medagent.proto.hl7_session.Hl7Session`. This module moves bytes, runs timers and calls
the sink; *which* ACK to send and in what order is the session's job::

    data_received -> decoder.feed -> for each frame: session.receive_frame
        Slot          -> sink.accept(slot.record, on_commit=slot.committed)   (durable modes)
                         kept for after the write                            (IMMEDIATE)
        Rejected      -> one log line (the AR/CR is queued in the session)
        FramingError  -> one log line; close after 10 in a row
    -> one transport.write(session.data_to_send()), only when the FIFO head is completed
    -> IMMEDIATE: the chunk's records to sink.accept (the device has its ACK first)

Completions outside ``data_received`` (commit callbacks of a group commit, bot replies, the
ORIGINAL timeout) are written at once when the session holds one slot (lock-step senders),
otherwise coalesced with ``loop.call_soon`` into one write.

Bad input (DESIGN.md "Testing"; MLLP Release 2): a frame without a readable MSH is a framing
error (logged with remote and size, never the bytes; counted); an oversize frame is answered
CR/AR from its head when the head has an MSH; the connection closes after 10 framing errors in
a row or more than 1 MiB of bytes outside frames since the last valid message. A disconnect
mid-frame loses only the partial frame; everything handed to the sink is committed as usual.

Flow control: :meth:`Hl7Channel.pause_reading` / ``resume_reading`` pause every connection
(runtime backpressure). ``messagesPerMin`` throttles per connection: frames wait in a backlog,
reading is paused while it is non-empty, and frames are dispatched at least ``60 /
messagesPerMin`` s apart. ``maxConnections`` refuses (closes at once, logged, counted)
connections beyond the limit, but first evicts the longest-idle connection that never sent a
message (defect 3; channels/listener.py); ``firstMessageTimeoutMs`` (30 s) closes a connection
that sent nothing since connecting; ``maxConnectionsPerAddress`` (off) limits one host;
``idleTimeoutMs`` closes a connection with nothing received and no ACK outstanding for that long
(0 disables). Accepted sockets get TCP keepalive and TCP_NODELAY.

TLS (``tlsCert``/``tlsKey``/``tlsCa``/``tlsClientAllow``; channels/tls.py, docs/tls.md): the
listener serves TLS 1.2+, reloads rotated certificates at the next handshake, and closes a
handshaken connection whose client certificate is outside the allow-list before it takes a slot.

The kind is registered by scheme at import (:data:`MLLP_KIND`, ``channels.base.register_kind``);
the runtime builds channels with ``channel_kind("mllp").create(name, endpoint, options,
context)``.

Invariants
----------
* Per connection, ACKs leave in the order the messages arrived (the session's FIFO).
* No positive ACK (AA/CA) before the sink reported the commit, except in IMMEDIATE mode.
* Message bodies are never logged unless ``log_phi``; logs carry remote, control ids, sizes.
* Every timer and transport a channel creates is gone after :meth:`Hl7Channel.stop`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from typing import Any, Final, cast

from medagent.channels import mllp_client as _mllp_client  # noqa: F401  (registers the outbound sender)
from medagent.channels.base import (
    LATENCY_BUCKETS_MS,
    ChannelContext,
    ChannelKind,
    ChannelStats,
    InboundSink,
    base_stats,
    register_kind,
)
from medagent.channels.endpoint import (
    MLLP_PARAMETERS,
    AckMode,
    Endpoint,
    MllpOptions,
    mllp_options,
    queue_duplicate_policy_name,
)
from medagent.channels.listener import Admission, listen
from medagent.channels.tls import ServerTls, server_tls
from medagent.proto.hl7_session import (
    MAX_CONSECUTIVE_FRAMING_ERRORS,
    FramingError,
    Hl7Counters,
    Hl7Session,
    Rejected,
    ReplyResult,
    SequenceCounter,
    Slot,
)
from medagent.proto.mllp import FrameTooLarge, MllpDecoder
from medagent.records import CommitResult, DuplicatePolicy, InboundRecord

__all__ = [
    "MAX_CONSECUTIVE_FRAMING_ERRORS",
    "MAX_JUNK_BYTES",
    "MLLP_KIND",
    "Hl7Channel",
    "Hl7Connection",
    "InboundSink",
]

logger = logging.getLogger(__name__)

#: Close a connection after this many bytes outside frames since its last valid message.
MAX_JUNK_BYTES: Final = 1024 * 1024

_LATENCY_KEYS: Final = tuple("+Inf" if bound == float("inf") else f"{bound:g}" for bound in LATENCY_BUCKETS_MS)


class Hl7Connection(asyncio.Protocol):
    """One device connection: decoder, session, timers. Created by Hl7Channel."""

    def __init__(self, channel: Hl7Channel) -> None:
        self._channel = channel
        self._options = channel.options
        self._counters = channel.counters
        self._loop = asyncio.get_running_loop()
        self._decoder = MllpDecoder(channel.options.max_frame_size)
        self._session = Hl7Session(channel.options, channel=channel.name, counters=channel.counters,
                                   sequence=channel.sequence, listener=self)
        self._transport: asyncio.Transport | None = None
        self.remote = "?"
        self.registered = False
        self.closed = False
        self._in_chunk = False
        self._flush_handle: asyncio.Handle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._junk_baseline = 0
        self._backlog: deque[bytes | FrameTooLarge] = deque()  # throttled (messagesPerMin)
        self._handoff: list[InboundRecord] = []  # IMMEDIATE: records of this chunk, sunk after its ACKs
        self._closing = False
        self._next_dispatch = 0.0
        self._throttle_timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._first_timer: asyncio.TimerHandle | None = None
        self.messages_seen = 0

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        self._session.remote = self.remote
        if not self._channel.admit(self):
            self._transport.abort()
            return
        self.registered = True
        _tune_socket(self._transport)
        self._last_activity = self._loop.time()
        self._arm_idle_timer()
        first = self._options.first_message_timeout_s
        if first > 0:
            self._first_timer = self._loop.call_later(first, self._check_first_message)
        self.update_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._counters.bytes_received += len(data)
        self._last_activity = self._loop.time()
        self._in_chunk = True
        try:
            self._feed(data)
        finally:
            self._in_chunk = False
        self._end_chunk()
        if self._decoder.discarded_bytes - self._junk_baseline > MAX_JUNK_BYTES:
            self._close_for_errors(f"more than {MAX_JUNK_BYTES} bytes outside MLLP frames")

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for handle in (self._flush_handle, self._deadline_timer, self._idle_timer, self._throttle_timer,
                       self._first_timer):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._deadline_timer = self._idle_timer = self._throttle_timer = None
        self._first_timer = None
        unanswered = self._session.unfinished
        if unanswered:
            logger.info("hl7 channel %s: %s disconnected with %d message(s) not yet acknowledged",
                        self._channel.name, self.remote, unanswered)
        if self._decoder.pending_bytes:
            logger.info("hl7 channel %s: %s disconnected mid-frame (%d bytes of a partial frame dropped)",
                        self._channel.name, self.remote, self._decoder.pending_bytes)
        self._backlog.clear()
        self._session.close()
        if self.registered:
            self._channel.release(self)

    # ------------------------------------------------------------------ intake

    def _feed(self, data: bytes) -> None:
        decoder = self._decoder
        while True:
            try:
                frames = decoder.feed(data)
                break
            except FrameTooLarge as exc:
                self._dispatch_frames(exc.frames)
                self._dispatch_frames([exc])
                data = b""
        self._dispatch_frames(frames)

    def _dispatch_frames(self, frames: list[bytes] | list[FrameTooLarge]) -> None:
        if not frames:
            return
        if self._options.messages_per_min is None:
            for frame in frames:
                if self._closing:
                    return  # closed for errors: what follows is neither stored nor answered
                self._handle(frame)
        else:
            self._backlog.extend(frames)
            self._pump()

    def _pump(self) -> None:
        """Dispatch throttled frames no faster than one per 60/messagesPerMin seconds."""
        self._throttle_timer = None
        if self.closed:
            return
        assert self._options.messages_per_min is not None
        interval = 60.0 / self._options.messages_per_min
        now = self._loop.time()
        in_chunk = self._in_chunk
        self._in_chunk = True
        try:
            while self._backlog and now >= self._next_dispatch and not self._closing:
                self._next_dispatch = now + interval
                self._handle(self._backlog.popleft())
        finally:
            self._in_chunk = in_chunk
        if not in_chunk:
            self._end_chunk()
        if self._backlog and self._throttle_timer is None:
            self._throttle_timer = self._loop.call_at(self._next_dispatch, self._pump)
        self.update_reading()

    def _handle(self, frame: bytes | FrameTooLarge) -> None:
        self.messages_seen += 1
        session = self._session
        result = session.receive_frame(frame, self._loop.time(), time.time())
        if type(result) is Slot:
            self._junk_baseline = self._decoder.discarded_bytes
            self._submit(result)
        elif type(result) is Rejected:
            logger.warning("hl7 channel %s: rejected message %s from %s (%d bytes): %s",
                           self._channel.name, result.control_id, self.remote, result.size, result.reason)
        else:
            assert isinstance(result, FramingError)
            logger.warning("hl7 channel %s: framing error from %s: %s (%d bytes dropped, no ACK possible)",
                           self._channel.name, self.remote, result.what, result.size)
            if result.close:
                self._close_for_errors(f"{session.framing_errors_in_row} framing errors in a row")

    def _submit(self, slot: Slot) -> None:
        channel = self._channel
        record = slot.record
        assert record is not None
        slot.record = None  # the sink owns it now; the slot keeps only what ACKs need
        if channel.log_phi:
            logger.debug("hl7 channel %s: %s message %r", channel.name, self.remote, record.body)
        if not self._session.durable:
            # IMMEDIATE promises nothing beyond receipt: the ACK is written first (_end_chunk)
            self._handoff.append(record)
            return
        if slot.deadline and self._deadline_timer is None:
            self._deadline_timer = self._loop.call_at(slot.deadline, self._expire_replies)
        self._accept(record, slot)

    def _accept(self, record: InboundRecord, slot: Slot | None) -> None:
        """Hand one record to the sink (`slot`: durable, answered at its commit)."""
        channel = self._channel
        try:
            channel.sink.accept(record, durable=slot is not None, dedup=channel.dedup_policy,
                                on_commit=slot.committed if slot is not None else None)
        except Exception as exc:  # noqa: BLE001 (any refusal of the runtime is answered as a storage error)
            self._counters.sink_errors += 1
            logger.error("hl7 channel %s: sink refused message %s from %s: %s",
                         channel.name, record.control_id, self.remote, exc)
            if slot is not None:
                slot.committed(CommitResult(None, None, f"storage error: {exc}"))

    def _end_chunk(self) -> None:
        """After a chunk's frames: write the ACKs that are ready, then (IMMEDIATE) hand the
        chunk's records to the sink. In durable modes nothing is ready yet (the commit comes
        later), so no empty write is attempted."""
        if self._session.writable:
            self._flush()
        if self._handoff:
            records, self._handoff = self._handoff, []
            for record in records:
                self._accept(record, None)

    # ------------------------------------------------------------------ session completions

    def slot_committed(self, slot: Slot, result: CommitResult) -> None:
        """A slot's on_commit (through Slot.committed): log what deserves it, then write."""
        if result.error is not None:
            logger.error("hl7 channel %s: message %s from %s was not stored: %s",
                         self._channel.name, slot.control_id, self.remote, result.error)
        elif result.control_id_reused:
            logger.warning("hl7 channel %s: message %s from %s reuses a recent control id with other content; "
                           "stored as a new message", self._channel.name, slot.control_id, self.remote)
        self._session.committed(slot, result)
        self._completed()

    def _completed(self) -> None:
        """Something in the session completed outside data_received: write it now or soon."""
        if self.closed:
            return
        self._channel.check_drained()
        if self._in_chunk or self._flush_handle is not None:
            return
        session = self._session
        if not session.writable:
            return
        if session.outstanding == 1:
            self._flush()  # lock-step sender: write at once
        else:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write the completed prefix of the session's FIFO in one transport.write."""
        self._flush_handle = None
        session = self._session
        transport = self._transport
        now = self._loop.time()
        if transport is None or self.closed or transport.is_closing():
            session.data_to_send(now, lost=True)
            return
        data = session.data_to_send(now)
        if data:
            self._last_activity = now
            transport.write(data)

    def _expire_replies(self) -> None:
        """ORIGINAL: answer AR for every message whose hub reply is overdue; re-arm."""
        self._deadline_timer = None
        if self.closed:
            return
        session = self._session
        for control_id in session.expire(self._loop.time()):
            logger.warning("hl7 channel %s: no hub response for message %s from %s within %g s; answering AR "
                           "(the message stays queued)", self._channel.name, control_id, self.remote,
                           self._options.response_timeout_s)
        deadline = session.next_deadline()
        if deadline is not None:
            self._deadline_timer = self._loop.call_at(deadline, self._expire_replies)
        self._completed()

    def deliver_reply(self, control_id: str, body: str, status_code: int) -> bool:
        """Route the bot's reply for message `control_id`; True when an ACK was queued."""
        result = self._session.reply(control_id, body, status_code, self._loop.time())
        if result is ReplyResult.LATE:
            logger.warning("hl7 channel %s: discarded a late or unexpected hub reply for message %s from %s",
                           self._channel.name, control_id, self.remote)
            return False
        if result is ReplyResult.WRITTEN:
            self._completed()
            return True
        return False

    # ------------------------------------------------------------------ bad input

    def _close_for_errors(self, why: str) -> None:
        if self.closed or self._transport is None or self._transport.is_closing():
            return
        self._closing = True
        self._counters.connections_closed_for_errors += 1
        logger.warning("hl7 channel %s: closing connection from %s: %s", self._channel.name, self.remote, why)
        self._flush()
        self._transport.close()

    # ------------------------------------------------------------------ flow control and timers

    def update_reading(self) -> None:
        """Pause or resume reading to match the channel's and the throttle's wishes."""
        transport = self._transport
        if transport is None or self.closed or transport.is_closing():
            return
        paused = self._channel.reading_paused or bool(self._backlog)
        if paused and not self._reading_paused:
            transport.pause_reading()
        elif not paused and self._reading_paused:
            transport.resume_reading()
        self._reading_paused = paused

    def _arm_idle_timer(self) -> None:
        idle = self._options.idle_timeout_s
        if idle > 0:
            self._idle_timer = self._loop.call_at(self._last_activity + idle, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self.closed or self._transport is None:
            return
        idle = self._options.idle_timeout_s
        busy = self._session.outstanding > 0 or bool(self._backlog)
        if self._loop.time() - self._last_activity >= idle and not busy:
            self._counters.connections_idle_closed += 1
            logger.info("hl7 channel %s: closing connection from %s idle for %g s",
                        self._channel.name, self.remote, idle)
            self._transport.close()
            return
        if busy:
            self._last_activity = self._loop.time()
        self._arm_idle_timer()

    def _check_first_message(self) -> None:
        """firstMessageTimeoutMs: close a connection that sent nothing at all since connecting."""
        self._first_timer = None
        if self.closed or self._transport is None or not self.evictable:
            return
        self._channel.admission.silent_close(self.remote, self._options.first_message_timeout_s)
        self._channel.connections_silent_closed += 1
        self._transport.close()

    @property
    def evictable(self) -> bool:
        """Never sent a message, no partial frame, nothing awaiting an ACK (listener.Evictable)."""
        return (self.messages_seen == 0 and not self._backlog and not self._decoder.pending_bytes
                and not self._session.unfinished)

    @property
    def idle_since(self) -> float:
        return self._last_activity

    def evict(self) -> None:
        """Channel full: this idle connection makes room (it is already out of the channel's dict)."""
        self._channel.connections_evicted += 1
        if self._transport is not None:
            self._transport.abort()

    @property
    def unfinished(self) -> int:
        """Messages on this connection whose ACK is not decided yet."""
        return self._session.unfinished

    def close(self) -> None:
        """Write what is ready and close the connection."""
        if self._transport is not None and not self._transport.is_closing():
            self._flush()
            self._transport.close()

    def decoder_counters(self) -> tuple[int, int, int]:
        decoder = self._decoder
        return decoder.discarded_bytes, decoder.missing_cr, decoder.truncated_frames


def _tune_socket(transport: asyncio.Transport) -> None:
    """TCP keepalive (dead peers are found; DESIGN.md defaults) and no Nagle delay on ACKs."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for level, option in ((socket.SOL_SOCKET, socket.SO_KEEPALIVE), (socket.IPPROTO_TCP, socket.TCP_NODELAY)):
        try:
            sock.setsockopt(level, option, 1)
        except (OSError, AttributeError):
            pass


class Hl7Channel:
    """An MLLP listener for one channel: the ``mllp`` kind's Channel (channels/base.py)."""

    def __init__(self, name: str, endpoint: Endpoint, options: MllpOptions,
                 context: ChannelContext | InboundSink, *, log_phi: bool = False, sequence_start: int = 0) -> None:
        self.name = name
        self.endpoint = endpoint
        self.options = options
        if isinstance(context, ChannelContext):
            self.sink: InboundSink = context.sink
            self.log_phi = context.log_phi
        else:  # the runtime's pre-registry call: Hl7Channel(name, endpoint, options, sink, log_phi=...)
            self.sink = context
            self.log_phi = log_phi
        self.dedup_policy = DuplicatePolicy[queue_duplicate_policy_name(options.duplicate_behavior)]
        self.counters = Hl7Counters(LATENCY_BUCKETS_MS)
        self.sequence = SequenceCounter(sequence_start)
        self.reading_paused = False
        self._server: asyncio.AbstractServer | None = None
        self._connections: dict[str, Hl7Connection] = {}
        self._closed_decoder_totals = [0, 0, 0]
        self._drained: asyncio.Event | None = None
        self._stopping = False
        self.admission = Admission(f"hl7 channel {name}", options.max_connections,
                                   options.max_connections_per_address)
        self.connections_evicted = 0
        self.connections_silent_closed = 0
        self.tls: ServerTls | None = None

    # ------------------------------------------------------------------ Channel protocol

    @property
    def kind(self) -> str:
        return "mllp"

    @property
    def wants_replies(self) -> bool:
        """ORIGINAL and TWO_PHASE send the bot's reply to the device."""
        return self.options.ack_mode is AckMode.ORIGINAL or self.options.ack_mode is AckMode.TWO_PHASE

    @property
    def encoding(self) -> str:
        return self.options.encoding

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on `sock` when given (handed over), else on the endpoint's host:port (0: any)."""
        if self._server is not None:
            raise RuntimeError(f"hl7 channel {self.name} is already started")
        self._stopping = False
        self.reading_paused = False
        self.tls = server_tls(f"hl7 channel {self.name}", self.endpoint)  # files read now: errors at start
        self._server = await listen(f"hl7 channel {self.name}", lambda: Hl7Connection(self), self.endpoint.host,
                                    self.endpoint.port, sock, self.tls, backlog=512)
        logger.debug("hl7 channel %s listening on %s:%d (ack mode %s%s)", self.name, self.host, self.port,
                    self.options.ack_mode.value, "" if self.tls is None else ", TLS")

    def listening_sockets(self) -> list[socket.socket]:
        """The listening sockets (asyncio's TransportSocket views: fileno(), getsockname())."""
        server: Any = self._server  # asyncio.Server or uvloop's: both have .sockets
        return list(server.sockets) if server is not None else []

    @property
    def host(self) -> str:
        return self._first_sockname()[0] if self._server is not None else self.endpoint.host

    @property
    def port(self) -> int:
        """The bound port (the real one when the endpoint asked for port 0)."""
        return int(self._first_sockname()[1]) if self._server is not None else self.endpoint.port

    def _first_sockname(self) -> Any:
        server: Any = self._server
        assert server is not None
        return server.sockets[0].getsockname()

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop accepting; wait up to `drain_timeout` s for outstanding ACKs; close everything.

        Reading is paused on every connection first, so no new message arrives while draining.
        Messages committed after the wait are still stored; only their ACK is lost.
        """
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        server.close()
        self.reading_paused = True
        for connection in list(self._connections.values()):
            connection.update_reading()
        if self._unfinished() and drain_timeout > 0:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), drain_timeout)
            except TimeoutError:
                logger.warning("hl7 channel %s: stopped with %d message(s) still awaiting their ACK",
                               self.name, self._unfinished())
            self._drained = None
        for connection in list(self._connections.values()):
            connection.close()
        await server.wait_closed()
        for _ in range(10):  # let connection_lost run (bounded)
            if not self._connections:
                break
            await asyncio.sleep(0.01)
        logger.info("hl7 channel %s stopped", self.name)

    def _unfinished(self) -> int:
        return sum(connection.unfinished for connection in self._connections.values())

    # ------------------------------------------------------------------ connection bookkeeping

    def admit(self, connection: Hl7Connection) -> bool:
        """Register a new connection, or refuse it (TLS allow-list, stopping, connection limits)."""
        counters = self.counters
        refusal = self.tls.refusal(connection._transport) if self.tls is not None else None
        if refusal is not None:
            counters.connections_refused += 1
            logger.warning("hl7 channel %s: refused connection from %s: %s", self.name, connection.remote, refusal)
            return False
        if self._stopping:
            counters.connections_refused += 1
            logger.warning("hl7 channel %s: refused connection from %s (stopping)", self.name, connection.remote)
            return False
        if self.admission.make_room(self._connections, connection.remote) is not None:
            counters.connections_refused += 1  # logged once per episode by the admission
            return False
        counters.connections_total += 1
        self._connections[connection.remote] = connection
        logger.debug("hl7 channel %s: connection from %s", self.name, connection.remote)
        return True

    def release(self, connection: Hl7Connection) -> None:
        if self._connections.get(connection.remote) is connection:
            del self._connections[connection.remote]
        for index, value in enumerate(connection.decoder_counters()):
            self._closed_decoder_totals[index] += value
        self.check_drained()

    def check_drained(self) -> None:
        """While stopping: wake stop() when no ACK is outstanding any more."""
        if self._drained is not None and not self._unfinished():
            self._drained.set()

    # ------------------------------------------------------------------ runtime API

    def deliver_reply(self, remote: str, control_id: str, body: str, status_code: int = 200) -> bool:
        """Hand the bot's reply for a message of this channel to its device connection.

        Applies the mode's rules (ackpolicy.reply_decision). Returns True when an ACK was
        written (or queued behind earlier ACKs); False when the connection is gone, the reply
        is late/unknown, or it is suppressed by the mode, appLevelAck or MSH-16 (all counted).
        """
        connection = self._connections.get(remote)
        if connection is None or connection.closed:
            self.counters.replies_no_connection += 1
            logger.warning("hl7 channel %s: hub reply for message %s dropped: connection %s is gone",
                           self.name, control_id, remote)
            return False
        delivered = connection.deliver_reply(control_id, body, status_code)
        self.check_drained()
        return delivered

    def pause_reading(self) -> None:
        """Backpressure: stop reading from every connection (new ones start paused)."""
        self.reading_paused = True
        for connection in list(self._connections.values()):
            connection.update_reading()

    def resume_reading(self) -> None:
        """Undo pause_reading (not while stopping)."""
        if self._stopping:
            return
        self.reading_paused = False
        for connection in list(self._connections.values()):
            connection.update_reading()

    def stats(self) -> dict[str, Any]:
        """The shared stats shape (channels.base.base_stats) plus the HL7 counters as extras.

        The extras keep today's snake_case keys (counters, decoder totals, ``connections_open``,
        ``acks_pending``, ``ack_mode``, ``reading_paused``) for existing consumers.
        """
        counters = self.counters
        extra: dict[str, Any] = counters.as_dict()
        totals = list(self._closed_decoder_totals)
        for connection in self._connections.values():
            for index, value in enumerate(connection.decoder_counters()):
                totals[index] += value
        extra["discarded_bytes"], extra["missing_cr"], extra["truncated_frames"] = totals
        extra["connections_open"] = len(self._connections)
        extra["acks_pending"] = self._unfinished()
        extra["ack_mode"] = self.options.ack_mode.value
        extra["reading_paused"] = self.reading_paused
        extra["controlIdReused"] = counters.control_id_reused
        extra["connections_evicted"] = self.connections_evicted
        extra["connections_silent_closed"] = self.connections_silent_closed
        extra["tls"] = self.tls is not None
        if self.tls is not None:
            extra["tls_reloads"] = self.tls.reloads
            extra["tls_clients_refused"] = self.tls.refused
        shared = ChannelStats(
            connections_open=len(self._connections),
            connections_total=counters.connections_total,
            units_in=counters.messages_received,
            units_out=counters.acks_positive + counters.acks_negative + counters.replies_other,
            bytes_in=counters.bytes_received,
            bytes_out=counters.bytes_sent,
            errors=counters.framing_errors + counters.messages_rejected + counters.sink_errors,
            answers=dict(counters.answers),
            latency_ms={key: count for key, count in zip(_LATENCY_KEYS, counters.latency, strict=True) if count},
        )
        return base_stats("mllp", shared, extra)


def _create(name: str, endpoint: Endpoint, options: MllpOptions, context: ChannelContext) -> Hl7Channel:
    return Hl7Channel(name, endpoint, options, context)


#: The ``mllp://`` kind (HL7 v2 over MLLP, inbound), registered when this module is imported.
MLLP_KIND: Final = register_kind(ChannelKind(
    scheme="mllp",
    parameters=MLLP_PARAMETERS,
    parse_options=mllp_options,
    create=_create,
    description="HL7 v2 over MLLP: listener with original, two-phase, fast and immediate ACK modes",
))
