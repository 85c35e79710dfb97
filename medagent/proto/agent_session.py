"""The Medplum agent websocket protocol as a pure state machine, one core for both ends.

Theory of operation
-------------------
h11 style: the I/O skin (``cloud/link.py`` on the agent, ``hub/websocket.py`` on the hub) moves
bytes and drives time; this module decides. The skin

* feeds every received websocket message to :meth:`AgentSession.receive_frame` /
  :meth:`HubSession.receive_frame` and acts on the returned events;
* writes whatever :meth:`data_to_send` returns, in order, as TEXT frames (answers the core
  produced itself — heartbeat responses, ``agent:error`` for bad frames — come before queued
  transmits);
* calls :meth:`tick` with the current monotonic time whenever :meth:`next_deadline` has passed.

No I/O, no clock, no asyncio here: time comes in as ``now`` arguments, so every transition can be
tested by feeding frames and times (tests/proto/test_agent_session.py).

What the core keeps (shared/medplum-protocol.md §1.2, §1.3, §2; the batching extension is
described in :mod:`medagent.cloud.messages`):

* **Connect sequencing** (§1.2). Agent: :meth:`AgentSession.connect` queues
  ``agent:connect:request``; the session is live on ``agent:connect:response`` (legacy
  ``connected``) and reports :class:`Live` once. A callback-less ``agent:error`` before that is the
  hub refusing the connect. Hub: ``agent:connect:request`` is checked for its fields exactly as
  Medplum's ``handleConnect`` words its errors (the socket stays open); a complete one becomes
  :class:`ConnectRequested`, and the skin, which can verify tokens, answers :meth:`HubSession.accept`
  or :meth:`HubSession.refuse`. Any other frame before that gets ``agent:error`` (not connected).
* **Heartbeats** (§1.3) as deadlines: every ``heartbeat_s`` a tick sends
  ``agent:heartbeat:request`` while live. Any received frame is proof of life (under a burst the
  peer's heartbeat reply queues behind thousands of others) and clears the outstanding count; when
  ``max_missed_heartbeats`` ticks pass without one, the tick ends the session with
  :class:`SessionEnd` ``DEAD`` (abort: a half-open TCP connection will not finish a closing
  handshake). The agent also ends a socket that is not live after ``MAX_NOT_LIVE_TICKS`` ticks
  (Medplum: a lost connect request).
* **Batch bookkeeping**. Agent: transmits queued with :meth:`AgentSession.send_transmit` are
  encoded by :meth:`AgentSession.data_to_send` — one frame each towards a plain Medplum hub
  (confirmed by the transmit response or ``agent:error`` with the same callback), or packed into
  ``agent:batch`` frames with ``seq`` = 1, 2, ... when the hub advertised ``features.batch``
  (confirmed cumulatively by ``agent:batch:ack {seq}``). Hub: each batch's ``seq`` must be above
  the previous one; :meth:`HubSession.acknowledge` turns "stored up to seq n" into an ack frame,
  never for a seq not yet received and never twice.
* **Correlation by callback**. Agent requests awaiting a reply (:meth:`expect_reply`) get their
  answer as :class:`Reply`; on the hub every reply type (transmit/reloadconfig/upgrade/logs/stats
  responses, ``agent:error``) is a :class:`Reply` for whoever waits on its callback.
* **Error routing** (§2 rules). A frame that is not valid JSON or lacks fields is answered with
  ``agent:error`` (the callback when it could be read) and reported as :class:`Violation`; an
  unknown type gets ``"Unknown message type: <t>"``. On the agent, a hub ``agent:error`` with a
  callback is :class:`TransmitFailed` (and confirms that transmit in plain mode), ``"Invalid access
  token"`` ends the session (:class:`SessionEnd` ``TOKEN_REJECTED``), and anything else is
  :class:`PeerError`, only to be logged.

Invariants
----------
* Every callback handed to :meth:`AgentSession.send_transmit` while live is confirmed at most
  once, in send order per mode, and only by the frame that answers it (plain) or by a batch ack
  covering its batch (batch). What is unconfirmed when the session ends stays unconfirmed.
* ``agent:batch`` and the ``duplicateOf``/``noReply`` fields are never sent to a hub that did not
  advertise ``features.batch``.
* :class:`Live` is reported at most once per session; after a :class:`SessionEnd` the session
  reports nothing more and queues nothing more.
* The core never raises on received bytes: every bad frame has an answer.
"""

from __future__ import annotations

import enum
import types
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from medagent.cloud import messages as m

__all__ = [
    "BATCH_FRAME_TARGET_BYTES",
    "INVALID_ACCESS_TOKEN",
    "MAX_NOT_LIVE_TICKS",
    "MISSING_ACCESS_TOKEN",
    "MISSING_AGENT_ID",
    "NOT_CONNECTED",
    "AgentSession",
    "BatchSettings",
    "Confirmed",
    "ConnectRequested",
    "EndKind",
    "Event",
    "HeartbeatAnswered",
    "HubSession",
    "Live",
    "PeerError",
    "Reply",
    "Request",
    "SessionEnd",
    "SessionState",
    "TransmitAnswered",
    "TransmitFailed",
    "TransmitsReceived",
    "Violation",
]

#: Medplum server's connect errors (server ``agent/websockets.ts`` ``handleConnect``).
MISSING_ACCESS_TOKEN: Final = "Missing access token"
MISSING_AGENT_ID: Final = "Missing agent ID"
INVALID_ACCESS_TOKEN: Final = "Invalid access token"
NOT_CONNECTED: Final = "Not connected: send agent:connect:request first"
#: Ticks without ``agent:connect:response`` before the agent replaces the socket (Medplum: 2).
MAX_NOT_LIVE_TICKS: Final = 2
#: agent:batch frames are cut at about this size even when the limits allow more. Frames below
#: glibc's 128 KiB mmap threshold reuse heap memory; 350 KiB frames cost ~4 µs/message more in
#: page faults and kernel time on the sender (measured on loopback, 625-byte HL7 messages).
BATCH_FRAME_TARGET_BYTES: Final = 96 * 1024

_HEARTBEAT_REQUEST_FRAME: Final = m.encode(m.HeartbeatRequest())
_NOT_JSON: Final = object()  # _parse's answer for bytes that are not JSON (JSON null is None)


class SessionState(enum.IntEnum):
    AWAITING_CONNECT = 0  # socket open, no connect response (agent) / accepted connect (hub) yet
    LIVE = 1
    CLOSED = 2


class EndKind(enum.IntEnum):
    """Why a session must end (:class:`SessionEnd`)."""

    REFUSED = 0  # the hub answered the connect with a callback-less agent:error
    TOKEN_REJECTED = 1  # "Invalid access token": renew the token before reconnecting
    NOT_LIVE = 2  # no connect response within MAX_NOT_LIVE_TICKS ticks
    DEAD = 3  # no frame at all for max_missed_heartbeats ticks: abort the socket


# -- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Live:
    """Agent: ``agent:connect:response`` received; ``features`` is empty for a plain Medplum hub."""

    features: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Confirmed:
    """Agent: the hub confirmed these transmit requests (by callback), in send order."""

    callbacks: list[str]


@dataclass(frozen=True, slots=True)
class TransmitAnswered:
    """Agent: the bot's reply to an inbound message."""

    message: m.TransmitResponse


@dataclass(frozen=True, slots=True)
class TransmitFailed:
    """Agent: the hub answered the request with this callback with ``agent:error``."""

    callback: str
    reason: str


@dataclass(frozen=True, slots=True)
class Request:
    """Agent: a hub request (outbound transmit, reloadconfig, upgrade, logs, stats) to answer."""

    message: m.AgentMessage


@dataclass(frozen=True, slots=True)
class Reply:
    """A frame answering a request this side waits for (same callback)."""

    message: m.AgentMessage


@dataclass(frozen=True, slots=True)
class HeartbeatAnswered:
    """A heartbeat response: the peer's version; ``sent_at`` of our last request (None if none)."""

    version: str
    sent_at: float | None


@dataclass(frozen=True, slots=True)
class PeerError:
    """An ``agent:error`` that nobody waits for: log it, nothing else."""

    body: str
    callback: str | None


@dataclass(frozen=True, slots=True)
class Violation:
    """A frame we could not use; it has been answered with ``agent:error`` already. Log once."""

    problem: str
    size: int


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """The session must end now (the skin closes the socket; ``abort`` without a handshake)."""

    kind: EndKind
    reason: str

    @property
    def abort(self) -> bool:
        return self.kind is EndKind.DEAD


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """Hub: a complete ``agent:connect:request``; answer with accept() or refuse()."""

    access_token: str
    agent_id: str
    callback: str | None


@dataclass(frozen=True, slots=True)
class TransmitsReceived:
    """Hub: one frame's transmit requests (``seq`` when it was an ``agent:batch``)."""

    requests: tuple[m.TransmitRequest, ...]
    seq: int | None


Event = (
    Live | Confirmed | TransmitAnswered | TransmitFailed | Request | Reply | HeartbeatAnswered
    | PeerError | Violation | SessionEnd | ConnectRequested | TransmitsReceived
)


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """Our own per-frame limits for ``agent:batch`` (the hub's advertised ones may lower them)."""

    enabled: bool = True
    max_messages: int = 1000
    max_bytes: int = 4 * 1024 * 1024


# -- the shared part ----------------------------------------------------------------------------


class _Session:
    """What both ends share: outbox, state, heartbeat deadlines, decoding with error routing."""

    _RECEIVER: m.Receiver

    def __init__(self, *, version: str, heartbeat_s: float, max_missed_heartbeats: int | None,
                 now: float) -> None:
        if heartbeat_s <= 0 or (max_missed_heartbeats is not None and max_missed_heartbeats < 1):
            raise ValueError("heartbeat_s must be > 0 and max_missed_heartbeats >= 1")
        self.version = version
        self.state = SessionState.AWAITING_CONNECT
        self._outbox: list[bytes] = []
        self._period = heartbeat_s
        self._max_missed = max_missed_heartbeats
        self._next_tick = now + heartbeat_s
        #: heartbeat periods since the last frame from the peer (reset by any frame)
        self.outstanding_heartbeats = 0
        self._heartbeat_sent_at: float | None = None
        self.frames_received = 0
        self.messages_received = 0

    @property
    def live(self) -> bool:
        return self.state is SessionState.LIVE

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    def has_data(self) -> bool:
        """Whether :meth:`data_to_send` would return something (cheap; for the writer's wake-up)."""
        return bool(self._outbox)

    def data_to_send(self) -> list[bytes]:
        """Encoded frames to write, in order; each is one websocket TEXT frame."""
        frames, self._outbox = self._outbox, []
        return frames

    def next_deadline(self) -> float:
        """When :meth:`tick` must run next (monotonic seconds, the clock the skin passes in)."""
        return self._next_tick

    def close(self) -> None:
        """The socket is gone: nothing is queued or reported any more."""
        self.state = SessionState.CLOSED
        self._outbox = []

    def send(self, message: m.AgentMessage) -> None:
        """Queue any message (replies, requests) as one frame."""
        if self.state is not SessionState.CLOSED:
            self._outbox.append(self._encode(message))

    def _encode(self, message: m.AgentMessage) -> bytes:
        return m.encode(message)

    def _error(self, body: str, callback: str | None) -> None:
        self._outbox.append(m.encode(m.ErrorMessage(body=body, callback=callback)))

    def _heartbeat_tick(self, now: float, events: list[Event]) -> None:
        """One heartbeat period passed while live: dead-link check, then a heartbeat request."""
        if self._max_missed is not None and self.outstanding_heartbeats >= self._max_missed:
            events.append(SessionEnd(EndKind.DEAD, f"no traffic for {self._max_missed} heartbeat "
                                                   "periods (dead link)"))
            return
        self.outstanding_heartbeats += 1
        self._heartbeat_sent_at = now
        self._outbox.append(_HEARTBEAT_REQUEST_FRAME)

    def _advance_clock(self, now: float) -> bool:
        """True when a tick is due; schedules the next one a whole period later."""
        if now < self._next_tick or self.state is SessionState.CLOSED:
            return False
        self._next_tick = now + self._period  # a late tick never causes a burst of catch-up ticks
        return True

    def _parse(self, frame: bytes | bytearray | memoryview | str) -> Any:
        """JSON of a frame, or :data:`_NOT_JSON` after answering it with ``agent:error``."""
        self.frames_received += 1
        self.outstanding_heartbeats = 0  # any traffic proves the link alive
        try:
            return orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            self._malformed(self._json_problem(exc), None)
            return _NOT_JSON

    def _json_problem(self, exc: orjson.JSONDecodeError) -> str:
        return f"invalid JSON: {exc}"  # the wording of messages.decode, which the agent used

    def _decode(self, data: Any, size: int, events: list[Event]) -> m.AgentMessage | None:
        try:
            return m.decode_dict(data, self._RECEIVER)
        except m.UnknownMessageType as exc:
            self._error(str(exc), exc.callback)
            events.append(Violation(f"unknown message type {exc.message_type!r}", size))
        except m.ProtocolError as exc:
            self._malformed(str(exc), exc.callback)
            events.append(Violation(f"malformed frame: {exc}", size))
        return None

    def _malformed(self, problem: str, callback: str | None) -> None:
        raise NotImplementedError


# -- the agent end ------------------------------------------------------------------------------


_HUB_REQUEST_TYPES: Final = frozenset(
    {m.TransmitRequest, m.ReloadConfigRequest, m.UpgradeRequest, m.LogsRequest, m.StatsRequest}
)


class AgentSession(_Session):
    """The agent's end of one websocket connection (see the module docstring)."""

    _RECEIVER = "agent"

    def __init__(self, *, version: str, now: float, heartbeat_s: float = 10.0,
                 max_missed_heartbeats: int = 2, batching: BatchSettings = BatchSettings()) -> None:
        super().__init__(version=version, heartbeat_s=heartbeat_s,
                         max_missed_heartbeats=max_missed_heartbeats, now=now)
        if batching.max_messages < 1 or batching.max_bytes < 1024:
            raise ValueError("max_messages must be >= 1 and max_bytes >= 1024")
        self._batching = batching
        #: the current access token, written into every transmit at send time (§1.1)
        self.access_token: str | None = None
        self.features: Mapping[str, Any] = types.MappingProxyType({})
        #: (max messages, max bytes) per agent:batch frame, or None in plain mode
        self.batch_limits: tuple[int, int] | None = None
        self._transmits: list[m.TransmitRequest] = []
        self._next_seq = 1
        self._unacked: deque[tuple[int, list[str]]] = deque()
        self._unconfirmed: set[str] = set()  # plain mode: sent, not yet answered
        self._awaiting: set[str] = set()  # callbacks of our requests waiting for a reply
        self._not_live_ticks = 0
        self.transmits_sent = 0
        self.batches_sent = 0
        self.frames_sent = 0
        self.confirmed = 0

    # -- sending --

    def connect(self, access_token: str, agent_id: str) -> None:
        """Queue ``agent:connect:request`` (the first frame of every connection, §1.2)."""
        self.access_token = access_token
        self._outbox.append(m.encode(m.ConnectRequest(access_token=access_token, agent_id=agent_id)))

    def send_transmit(self, message: m.TransmitRequest) -> bool:
        """Queue a device message; False when not live (the caller keeps it for the next session)."""
        if self.state is not SessionState.LIVE:
            return False
        if message.callback is None:
            raise ValueError("send_transmit needs a message with a callback (its confirmation id)")
        self._transmits.append(message)
        return True

    def has_data(self) -> bool:
        return bool(self._outbox or self._transmits)

    def data_to_send(self) -> list[bytes]:
        frames, self._outbox = self._outbox, []
        if self._transmits:
            transmits, self._transmits = self._transmits, []
            frames.extend(self._encode_transmits(transmits))
        self.frames_sent += len(frames)
        return frames

    def _encode(self, message: m.AgentMessage) -> bytes:
        if type(message) is m.TransmitRequest:
            return m.encode_transmit(message, self.access_token, extensions=False)
        return m.encode(message)

    def _encode_transmits(self, messages: list[m.TransmitRequest]) -> list[bytes]:
        token = self.access_token
        encode = m.encode_transmit
        self.transmits_sent += len(messages)
        if self.batch_limits is None:
            self._unconfirmed.update(message.callback for message in messages)  # type: ignore[misc]
            return [encode(message, token, False) for message in messages]
        max_messages, max_bytes = self.batch_limits
        budget = min(max_bytes, BATCH_FRAME_TARGET_BYTES) - m.BATCH_FRAME_OVERHEAD
        frames: list[bytes] = []
        parts: list[bytes] = []
        callbacks: list[str] = []
        size = 0
        for message in messages:
            data = encode(message, token, True)
            if parts and (len(parts) >= max_messages or size + len(data) > budget):
                frames.append(self._batch(parts, callbacks))
                parts, callbacks, size = [], [], 0
            parts.append(data)
            callbacks.append(message.callback)  # type: ignore[arg-type]
            size += len(data) + 1
        frames.append(self._batch(parts, callbacks))
        return frames

    def _batch(self, parts: list[bytes], callbacks: list[str]) -> bytes:
        seq = self._next_seq
        self._next_seq = seq + 1
        self._unacked.append((seq, callbacks))
        self.batches_sent += 1
        return m.batch_frame(seq, parts)

    def expect_reply(self, callback: str) -> None:
        """The next frame with ``callback`` (other than a hub request) is a :class:`Reply`."""
        if callback in self._awaiting:
            raise ValueError(f"a request with callback {callback} is already waiting")
        self._awaiting.add(callback)

    def forget(self, callback: str) -> None:
        self._awaiting.discard(callback)

    def unconfirmed_count(self) -> int:
        """Transmits written (returned by data_to_send) and not confirmed yet."""
        return len(self._unconfirmed) + sum(len(cbs) for _, cbs in self._unacked)

    def queued_transmits(self) -> int:
        """Transmits accepted by send_transmit and not yet written."""
        return len(self._transmits)

    def backlog(self) -> int:
        return len(self._transmits) + len(self._outbox)

    # -- time --

    def tick(self, now: float) -> list[Event]:
        events: list[Event] = []
        if not self._advance_clock(now):
            return events
        if self.state is SessionState.AWAITING_CONNECT:
            self._not_live_ticks += 1
            if self._not_live_ticks >= MAX_NOT_LIVE_TICKS:
                events.append(SessionEnd(EndKind.NOT_LIVE, f"no agent:connect:response in "
                                                           f"{MAX_NOT_LIVE_TICKS} heartbeat periods"))
        else:
            self._heartbeat_tick(now, events)
        return self._ended(events)

    # -- receiving --

    def receive_frame(self, frame: bytes | bytearray | memoryview | str) -> list[Event]:
        """Handle one received websocket message; returns what the skin must act on."""
        events: list[Event] = []
        if self.state is SessionState.CLOSED:
            return events
        data = self._parse(frame)
        if data is _NOT_JSON:
            events.append(Violation("invalid JSON", len(frame)))
            return events
        message = self._decode(data, len(frame), events)
        if message is None:
            return events
        if type(message) is m.Batch:
            self.messages_received += len(message.messages)
            for item in message.messages:
                self._on_message(item, events)
                if events and type(events[-1]) is SessionEnd:
                    break
        else:
            self.messages_received += 1
            self._on_message(message, events)
        return self._ended(events)

    def _ended(self, events: list[Event]) -> list[Event]:
        if events and type(events[-1]) is SessionEnd:
            self.close()
        return events

    def _malformed(self, problem: str, callback: str | None) -> None:
        self._error(f"WebSocket error on incoming message: {problem}", callback)

    def _on_message(self, message: m.AgentMessage, events: list[Event]) -> None:
        kind = type(message)
        callback: str | None = getattr(message, "callback", None)
        if callback is not None and callback in self._awaiting and kind not in _HUB_REQUEST_TYPES:
            self._awaiting.discard(callback)
            events.append(Reply(message))
        elif kind is m.TransmitResponse:
            if self.batch_limits is None and callback in self._unconfirmed:
                self._unconfirmed.discard(callback)  # type: ignore[arg-type]
                self._confirm([callback], events)  # type: ignore[list-item]
            events.append(TransmitAnswered(message))  # type: ignore[arg-type]
        elif kind is m.BatchAck:
            self._on_batch_ack(message.seq, events)  # type: ignore[attr-defined]
        elif kind in _HUB_REQUEST_TYPES:
            events.append(Request(message))
        elif kind is m.HeartbeatRequest:
            self._outbox.append(m.encode(m.HeartbeatResponse(version=self.version, callback=callback)))
        elif kind is m.HeartbeatResponse:
            sent_at, self._heartbeat_sent_at = self._heartbeat_sent_at, None
            events.append(HeartbeatAnswered(message.version, sent_at))  # type: ignore[attr-defined]
        elif kind is m.ErrorMessage:
            self._on_error(message.body, callback, events)  # type: ignore[attr-defined]
        elif kind is m.ConnectResponse:
            if self.state is SessionState.AWAITING_CONNECT:
                self._go_live(message.features or {})  # type: ignore[attr-defined]
                events.append(Live(self.features))
        else:  # a known type that only flows agent -> hub
            self._error(f"Unknown message type: {message.TYPE}", callback)
            events.append(Violation(f"{message.TYPE} is not for the agent", 0))

    def _go_live(self, features: Mapping[str, Any]) -> None:
        self.state = SessionState.LIVE
        self.features = types.MappingProxyType(dict(features))
        self.batch_limits = _batch_limits(self.features, self._batching)
        self.outstanding_heartbeats = 0

    def _confirm(self, callbacks: list[str], events: list[Event]) -> None:
        self.confirmed += len(callbacks)
        events.append(Confirmed(callbacks))

    def _on_batch_ack(self, seq: int, events: list[Event]) -> None:
        # cumulative: every batch with seq <= the acked one is stored; stale acks confirm nothing
        batches = self._unacked
        callbacks: list[str] = []
        while batches and batches[0][0] <= seq:
            callbacks.extend(batches.popleft()[1])
        if callbacks:
            self._confirm(callbacks, events)

    def _settled_by_error(self, callback: str) -> None:
        """The hub answered this transmit with agent:error, so its batch's cumulative ack must
        not confirm it: the agent may have sent it again meanwhile under a later seq (a
        transient store failure), and only that send's ack means it is stored. The error
        answers the earliest unacked send of the callback (the hub answers in order)."""
        for _, callbacks in self._unacked:
            if callback in callbacks:
                callbacks.remove(callback)
                return

    def _on_error(self, body: str, callback: str | None, events: list[Event]) -> None:
        if INVALID_ACCESS_TOKEN.lower() in body.lower():
            events.append(SessionEnd(EndKind.TOKEN_REJECTED, "the hub rejected the access token"))
        elif callback is not None:
            events.append(TransmitFailed(callback, body))
            if self.batch_limits is None:
                if callback in self._unconfirmed:
                    self._unconfirmed.discard(callback)
                    self._confirm([callback], events)
            else:
                self._settled_by_error(callback)
        elif self.state is SessionState.AWAITING_CONNECT:
            events.append(SessionEnd(EndKind.REFUSED, f"hub refused the connection: {body}"))
        else:
            events.append(PeerError(body, None))


def _batch_limits(features: Mapping[str, Any], ours: BatchSettings) -> tuple[int, int] | None:
    """Per-frame limits for agent:batch, or None when batching must not be used."""
    advertised = features.get("batch")
    if not ours.enabled or not isinstance(advertised, Mapping):
        return None

    def limit(key: str, own: int) -> int:
        theirs = advertised.get(key)
        if isinstance(theirs, int) and not isinstance(theirs, bool) and theirs > 0:
            return min(own, theirs)
        return own

    return limit("maxMessages", ours.max_messages), limit("maxBytes", ours.max_bytes)


# -- the hub end --------------------------------------------------------------------------------


#: replies from the agent that settle a request waiting on their callback
_REPLY_TYPES: Final = frozenset(
    {m.TransmitResponse, m.ReloadConfigResponse, m.UpgradeResponse, m.LogsResponse,
     m.StatsResponse, m.ErrorMessage}
)


class HubSession(_Session):
    """The hub's end of one agent websocket (see the module docstring).

    ``max_missed_heartbeats=None`` leaves dead-link detection to the transport (websocket pings).
    """

    _RECEIVER = "hub"

    def __init__(self, *, version: str, now: float, heartbeat_s: float = 10.0,
                 max_missed_heartbeats: int | None = None) -> None:
        super().__init__(version=version, heartbeat_s=heartbeat_s,
                         max_missed_heartbeats=max_missed_heartbeats, now=now)
        self.agent_id: str | None = None
        #: the agent has sent an agent:batch on this connection, so replies may be batched too
        self.batching = False
        self._last_seq_received = 0
        self._last_seq_acked = 0

    # -- connect --

    def accept(self, agent_id: str, features: Mapping[str, Any], callback: str | None) -> None:
        """The connect request's token is valid for ``agent_id``: go live, answer the response."""
        self.agent_id = agent_id
        if self.state is SessionState.AWAITING_CONNECT:
            self.state = SessionState.LIVE
        self._outbox.append(m.encode(m.ConnectResponse(callback, dict(features))))

    def refuse(self, reason: str) -> None:
        """The connect request was refused (bad token, unknown agent); the socket stays open."""
        self._error(reason, None)

    # -- acks --

    def acknowledge(self, seq: int) -> None:
        """Every batch up to ``seq`` is stored: queue ``agent:batch:ack`` (cumulative, once)."""
        seq = min(seq, self._last_seq_received)  # never confirm what has not arrived
        if seq > self._last_seq_acked and self.state is not SessionState.CLOSED:
            self._last_seq_acked = seq
            self._outbox.append(m.encode(m.BatchAck(seq)))

    # -- time --

    def tick(self, now: float) -> list[Event]:
        events: list[Event] = []
        if self._advance_clock(now) and self.state is SessionState.LIVE:
            self._heartbeat_tick(now, events)
            if events:
                self.close()
        return events

    # -- receiving --

    def receive_frame(self, frame: bytes | bytearray | memoryview | str) -> list[Event]:
        events: list[Event] = []
        if self.state is SessionState.CLOSED:
            return events
        data = self._parse(frame)
        if data is _NOT_JSON:
            events.append(Violation("invalid JSON", len(frame)))
            return events
        if type(data) is dict and data.get("type") == m.ConnectRequest.TYPE:
            self._on_connect(data, events)
            return events
        message = self._decode(data, len(frame), events)
        if message is None:
            return events
        if self.state is not SessionState.LIVE:
            self._error(NOT_CONNECTED, getattr(message, "callback", None))
            events.append(Violation(f"{message.TYPE} before agent:connect:request", len(frame)))
            return events
        if type(message) is m.Batch:
            self.messages_received += len(message.messages)
            self._on_batch(message, len(frame), events)
        else:
            self.messages_received += 1
            self._on_message(message, events)
        return events

    def _malformed(self, problem: str, callback: str | None) -> None:
        self._error(f"Invalid message: {problem}", callback)

    def _json_problem(self, exc: orjson.JSONDecodeError) -> str:
        return f"not JSON ({exc.msg})"

    def _on_connect(self, data: dict[str, Any], events: list[Event]) -> None:
        # checked on the raw JSON to give Medplum's exact errors, not a decoder message
        token, agent_id, callback = data.get("accessToken"), data.get("agentId"), data.get("callback")
        if not token or not isinstance(token, str):
            self._error(MISSING_ACCESS_TOKEN, None)
        elif not agent_id or not isinstance(agent_id, str):
            self._error(MISSING_AGENT_ID, None)
        elif self.agent_id not in (None, agent_id):  # one socket never changes agents
            self._error(INVALID_ACCESS_TOKEN, None)
        else:
            events.append(ConnectRequested(token, agent_id, callback if isinstance(callback, str) else None))

    def _on_batch(self, batch: m.Batch, size: int, events: list[Event]) -> None:
        seq = batch.seq
        if seq is not None:
            if seq <= self._last_seq_received:
                self._error(f"agent:batch seq {seq} is not above {self._last_seq_received}", None)
                events.append(Violation(f"agent:batch seq {seq} out of order", size))
                return
            self._last_seq_received = seq
        self.batching = True
        requests = []
        for item in batch.messages:
            if type(item) is m.TransmitRequest:
                requests.append(item)
            else:
                self._on_message(item, events)
        events.append(TransmitsReceived(tuple(requests), seq))

    def _on_message(self, message: m.AgentMessage, events: list[Event]) -> None:
        kind = type(message)
        if kind is m.TransmitRequest:
            events.append(TransmitsReceived((message,), None))  # type: ignore[arg-type]
        elif kind in _REPLY_TYPES:
            events.append(Reply(message))
        elif kind is m.HeartbeatRequest:
            callback = message.callback  # type: ignore[attr-defined]
            self._outbox.append(m.encode(m.HeartbeatResponse(self.version, callback)))
        elif kind is m.HeartbeatResponse:
            sent_at, self._heartbeat_sent_at = self._heartbeat_sent_at, None
            events.append(HeartbeatAnswered(message.version, sent_at))  # type: ignore[attr-defined]
        elif kind is m.BatchAck:
            pass  # the hub never asks for acks of its own batches
        else:
            self._error(f"Unexpected message type for the hub: {message.TYPE}",
                        getattr(message, "callback", None))
            events.append(Violation(f"{message.TYPE} is not for the hub", 0))
