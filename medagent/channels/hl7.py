"""Inbound HL7 v2 over MLLP: the listening channel (one asyncio.Protocol per connection).

Theory of operation
-------------------
:class:`Hl7Channel` listens on its endpoint's host:port. Every accepted TCP connection gets an
:class:`Hl7Connection` (a plain ``asyncio.Protocol``, not streams: this is the hot path) with
its own :class:`~medagent.proto.mllp.MllpDecoder`. For each chunk of bytes::

    data_received -> decoder.feed -> for each frame:
        parse_header (MSH)          no readable MSH   -> framing error (logged, counted)
        decode(frame, encoding)     Hl7Error          -> reject: CR (two-phase) / AR, nothing stored
        [assignSeqNo: MSH-13 := channel counter]
        InboundRecord(sender = MSH-3 "^" MSH-4) -> sink.accept(...)
    -> one transport.write with every ACK of the chunk that is ready

The ACK rules per mode (FAST, TWO_PHASE, ORIGINAL, IMMEDIATE), for duplicates, rejections,
timeouts, bot replies and MSH-15/MSH-16 are pure functions in :mod:`medagent.channels.ackpolicy`
(HL7 v2.5 ch. 2, 2.9 acknowledgment rules; medplum-protocol.md §4.3); this module only
applies them and moves bytes. ``proto.hl7.build_ack`` builds every ACK the channel writes.

Ordering: each message gets a *slot* in its connection's FIFO when it is received. A slot is
completed by the commit callback, the bot reply, the original-mode timeout or at once
(IMMEDIATE, rejections); it may complete silently when MSH-15/16 or ``appLevelAck`` say
"no ACK". Only the completed prefix of the FIFO is written, so a later message's ACK never
overtakes an earlier one's. Two-phase application ACKs (the bot's reply after the CA) are
appended as new completed slots. Completions outside ``data_received`` (commit callbacks of a
group commit) are written at once when the slot is the only one (lock-step senders), otherwise
coalesced with ``loop.call_soon`` into one write.

Bad input (DESIGN.md "Testing"; MLLP Release 2):

* A frame without a readable MSH cannot be acknowledged: it is a *framing error*, logged with
  remote, connection and size (never the bytes) and counted.
* A frame over ``maxFrameSize`` is answered with CR/AR built from its head when the head has a
  readable MSH, else it is a framing error. The connection stays open; the decoder resyncs.
* The connection is closed (with a log line) after 10 consecutive framing errors without a
  valid message in between, or when more than 1 MiB of bytes outside frames arrives since the
  last valid message (the tail of an oversize frame counts as such bytes).
* A disconnect mid-frame loses only the partial frame; everything already handed to the sink
  is committed and delivered as usual (its ACK is simply not written).

Flow control: :meth:`Hl7Channel.pause_reading` / :meth:`~Hl7Channel.resume_reading` pause every
connection (runtime backpressure). ``messagesPerMin`` throttles per connection: frames wait in a
backlog, reading is paused while it is non-empty, and frames are dispatched (handed to the sink,
and in IMMEDIATE mode ACKed) at least ``60 / messagesPerMin`` s apart. ``maxConnections``
refuses (closes at once, logged, counted) connections beyond the limit; ``idleTimeoutMs``
closes a connection with nothing received and no ACK outstanding for that long (0 disables).
Accepted sockets get TCP keepalive and TCP_NODELAY.

``assignSeqNo=true`` overwrites MSH-13 with a per-channel counter (starting at
``sequence_start``) before the message is stored; the stored body is the rewritten one. It is
applied to ASCII-compatible messages; UTF-16/32 messages are stored unchanged (counted).

Invariants
----------
* Per connection, ACKs leave in the order the messages arrived.
* No positive ACK (AA/CA) is written for a message before the sink reported its commit, except
  in IMMEDIATE mode; a storage error never yields AA/CA.
* Message bodies are never logged unless ``log_phi``; logs carry remote, control ids, sizes.
* Every timer and transport a channel creates is gone after :meth:`Hl7Channel.stop`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol, cast

from medagent.channels import ackpolicy
from medagent.channels.ackpolicy import AckCode, AckDecision, CommitOutcome, ReplyAction
from medagent.channels.endpoint import AckMode, Endpoint, MllpOptions, queue_duplicate_policy_name
from medagent.proto import hl7 as hl7proto
from medagent.proto.mllp import FrameTooLarge, InvalidPayload, MllpDecoder, encode
from medagent.queue.records import CommitResult, DuplicatePolicy, InboundRecord

__all__ = ["InboundSink", "Hl7Channel", "Hl7Connection", "MAX_CONSECUTIVE_FRAMING_ERRORS", "MAX_JUNK_BYTES"]

logger = logging.getLogger(__name__)

#: Close a connection after this many framing errors in a row (no valid message between).
MAX_CONSECUTIVE_FRAMING_ERRORS: Final = 10
#: Close a connection after this many bytes outside frames since its last valid message.
MAX_JUNK_BYTES: Final = 1024 * 1024
#: Two-phase: bot replies awaited per connection; beyond it the oldest entry is forgotten.
MAX_AWAITED_REPLIES: Final = 10_000

_POSITIVE_CODES: Final = frozenset({"AA", "CA"})


class InboundSink(Protocol):
    """Where a channel hands accepted messages (implemented by the agent runtime).

    durable=True: submit to the DurableQueue and call `on_commit` on the loop thread after
    COMMIT. durable=False (IMMEDIATE mode): forward from memory; `on_commit` is None.
    """

    def accept(
        self,
        record: InboundRecord,
        *,
        durable: bool,
        dedup: DuplicatePolicy,
        on_commit: Callable[[CommitResult], None] | None,
    ) -> None: ...


class SlotState(enum.IntEnum):
    """Where one message's ACK stands on its connection."""

    AWAIT_COMMIT = 0
    AWAIT_REPLY = 1  # ORIGINAL: committed, waiting for the bot's reply (or the timeout)
    READY = 2  # completed: `ack` is written when every earlier slot is ready (None: nothing)


class _Slot:
    """One message's place in its connection's ACK FIFO (mutable; lives until written)."""

    __slots__ = ("connection", "message", "control_id", "accept_ack_type", "app_ack_type", "charset",
                 "state", "ack", "ack_code", "deadline")

    def __init__(self, connection: Hl7Connection, message: bytes, header: Any, state: SlotState) -> None:
        self.connection = connection
        self.message = message  # what ACKs are built from (the whole frame, or its MSH)
        self.control_id: str = header.control_id
        self.accept_ack_type: str = header.accept_ack_type
        self.app_ack_type: str = header.app_ack_type
        self.charset: str = header.charset
        self.state = state
        self.ack: bytes | None = None
        self.ack_code: str | None = None
        self.deadline = 0.0

    def committed(self, result: CommitResult) -> None:
        """The sink's on_commit callback."""
        self.connection.slot_committed(self, result)


class _ReplyContext:
    """TWO_PHASE: what is needed to route and filter the bot's later reply."""

    __slots__ = ("message", "app_ack_type", "charset")

    def __init__(self, message: bytes, app_ack_type: str, charset: str) -> None:
        self.message = message
        self.app_ack_type = app_ack_type
        self.charset = charset


def _msh_only(frame: bytes) -> bytes:
    """The MSH segment of an ASCII-compatible frame (what ACKs need), else the whole frame."""
    if frame[:3] != b"MSH":
        return frame
    end = frame.find(b"\r")
    return frame if end < 0 else frame[:end]


def _rewrite_msh_field(frame: bytes, number: int, value: bytes) -> bytes | None:
    """`frame` with MSH-`number` replaced by `value`; None for UTF-16/32 (wide) frames.

    Only called on frames whose MSH parse_header accepted.
    """
    if b"\x00" in frame[:4]:
        return None
    start = frame.find(b"MSH")
    if start < 0:
        return None
    separator = frame[start + 3 : start + 4]
    end = len(frame)
    for terminator in (b"\r", b"\n"):
        found = frame.find(terminator, start, end)
        if found >= 0:
            end = found
    fields = frame[start:end].split(separator)
    index = number - 1
    if len(fields) <= index:
        fields.extend([b""] * (index + 1 - len(fields)))
    fields[index] = value
    return frame[:start] + separator.join(fields) + frame[end:]


def _frame(payload: bytes) -> bytes:
    """MLLP-frame an ACK we built; escape-free control bytes are an internal error."""
    try:
        return encode(payload)
    except InvalidPayload:
        # build_ack copies fields of a message that arrived in an MLLP frame and escapes what
        # it adds, so this means a reason text carried a control byte: drop those bytes.
        return encode(payload.replace(b"\x0b", b"").replace(b"\x1c", b""))


def _reply_codec(charset: str, default: str) -> str:
    """Codec to encode a bot reply with: the original message's MSH-18, else the channel's."""
    if charset:
        try:
            return hl7proto.codec_for_charset(charset)
        except hl7proto.Hl7Error:
            pass
    return default


class _Counters:
    """A channel's counters (plain ints on the hot path)."""

    __slots__ = (
        "connections_total", "connections_refused", "connections_closed_for_errors", "connections_idle_closed",
        "messages_received", "messages_rejected", "framing_errors", "acks_positive", "acks_negative",
        "acks_suppressed", "acks_lost", "replies_other", "bytes_received", "bytes_sent", "replies_delivered",
        "replies_suppressed", "replies_late", "replies_no_connection", "replies_timed_out",
        "seq_no_skipped", "discarded_bytes", "missing_cr", "truncated_frames", "sink_errors",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Hl7Connection(asyncio.Protocol):
    """One device connection: decoder, ACK FIFO, reply routing, timers. Created by Hl7Channel."""

    def __init__(self, channel: Hl7Channel) -> None:
        self._channel = channel
        self._options = channel.options
        self._mode = channel.options.ack_mode
        self._counters = channel.counters
        self._loop = asyncio.get_running_loop()
        self._decoder = MllpDecoder(channel.options.max_frame_size)
        self._transport: asyncio.Transport | None = None
        self.remote = "?"
        self.registered = False
        self.closed = False
        self._slots: deque[_Slot] = deque()
        self._awaiting: dict[str, deque[_Slot]] = {}  # ORIGINAL: control id -> slots awaiting reply
        self._contexts: dict[str, deque[_ReplyContext]] = {}  # TWO_PHASE: control id -> contexts
        self._context_count = 0
        self._in_chunk = False
        self._flush_handle: asyncio.Handle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._framing_errors_in_row = 0
        self._junk_baseline = 0
        self._backlog: deque[bytes | FrameTooLarge] = deque()  # throttled (messagesPerMin)
        self._closing = False
        self._next_dispatch = 0.0
        self._throttle_timer: asyncio.TimerHandle | None = None
        self._reading_paused = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        if not self._channel.admit(self):
            transport.abort()
            return
        self.registered = True
        _tune_socket(transport)
        self._last_activity = self._loop.time()
        self._arm_idle_timer()
        self.update_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        counters = self._counters
        counters.bytes_received += len(data)
        self._last_activity = self._loop.time()
        self._in_chunk = True
        try:
            self._feed(data)
        finally:
            self._in_chunk = False
        self._flush()
        if self._decoder.discarded_bytes - self._junk_baseline > MAX_JUNK_BYTES:
            self._close_for_errors(f"more than {MAX_JUNK_BYTES} bytes outside MLLP frames")

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for handle in (self._flush_handle, self._deadline_timer, self._idle_timer, self._throttle_timer):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._deadline_timer = self._idle_timer = self._throttle_timer = None
        unanswered = sum(1 for slot in self._slots if slot.state is not SlotState.READY)
        if unanswered:
            logger.info("hl7 channel %s: %s disconnected with %d message(s) not yet acknowledged",
                        self._channel.name, self.remote, unanswered)
        if self._decoder.pending_bytes:
            logger.info("hl7 channel %s: %s disconnected mid-frame (%d bytes of a partial frame dropped)",
                        self._channel.name, self.remote, self._decoder.pending_bytes)
        self._backlog.clear()
        self._awaiting.clear()
        self._contexts.clear()
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

    def _handle(self, item: bytes | FrameTooLarge) -> None:
        if type(item) is bytes:
            self._handle_frame(item)
        else:
            assert isinstance(item, FrameTooLarge)
            self._reject_oversize(item)

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
            self._flush()
        if self._backlog and self._throttle_timer is None:
            self._throttle_timer = self._loop.call_at(self._next_dispatch, self._pump)
        self.update_reading()

    def _handle_frame(self, frame: bytes) -> None:
        channel = self._channel
        try:
            header = hl7proto.parse_header(frame)
        except hl7proto.Hl7Error:
            self._framing_error(len(frame), "no readable MSH segment")
            return
        try:
            hl7proto.decode(frame, self._options.encoding)
        except hl7proto.Hl7Error as exc:
            self._reject(frame, header, str(exc))
            return
        self._framing_errors_in_row = 0
        self._junk_baseline = self._decoder.discarded_bytes
        self._counters.messages_received += 1
        if self._options.assign_seq_no:
            frame = channel.assign_sequence_number(frame)
        if channel.log_phi:
            logger.debug("hl7 channel %s: %s message %r", channel.name, self.remote, frame)
        record = InboundRecord(
            channel.name,
            self.remote,
            f"{header.sending_application}^{header.sending_facility}",
            header.control_id,
            header.message_type,
            frame,
            time.time(),
        )
        if self._mode is AckMode.IMMEDIATE:
            self._complete_new_slot(frame, header, ackpolicy.receipt_ack(
                self._mode, header.accept_ack_type, header.app_ack_type))
            self._submit(record, None, durable=False)
            return
        slot = _Slot(self, frame if self._mode is AckMode.ORIGINAL else _msh_only(frame), header,
                     SlotState.AWAIT_COMMIT)
        self._slots.append(slot)
        if self._mode is AckMode.ORIGINAL:
            self._await_reply(slot)
        self._submit(record, slot.committed, durable=True)

    def _submit(self, record: InboundRecord, on_commit: Callable[[CommitResult], None] | None,
                *, durable: bool) -> None:
        channel = self._channel
        try:
            channel.sink.accept(record, durable=durable, dedup=channel.dedup_policy, on_commit=on_commit)
        except Exception as exc:  # the runtime refused: answer as a storage error
            self._counters.sink_errors += 1
            logger.error("hl7 channel %s: sink refused message %s from %s: %s",
                         channel.name, record.control_id, self.remote, exc)
            if on_commit is not None:
                on_commit(CommitResult(None, None, f"storage error: {exc}"))

    # ------------------------------------------------------------------ bad input

    def _framing_error(self, size: int, what: str) -> None:
        self._counters.framing_errors += 1
        self._framing_errors_in_row += 1
        logger.warning("hl7 channel %s: framing error from %s: %s (%d bytes dropped, no ACK possible)",
                       self._channel.name, self.remote, what, size)
        if self._framing_errors_in_row >= MAX_CONSECUTIVE_FRAMING_ERRORS:
            self._close_for_errors(f"{self._framing_errors_in_row} framing errors in a row")

    def _reject(self, frame: bytes, header: Any, reason: str) -> None:
        self._counters.messages_rejected += 1
        logger.warning("hl7 channel %s: rejected message %s from %s (%d bytes): %s",
                       self._channel.name, header.control_id, self.remote, len(frame), reason)
        decision = ackpolicy.reject_ack(self._mode, reason, header.accept_ack_type, header.app_ack_type)
        self._complete_new_slot(frame, header, decision)

    def _reject_oversize(self, exc: FrameTooLarge) -> None:
        reason = f"message larger than the maximum frame size ({exc.limit} bytes)"
        try:
            header = hl7proto.parse_header(exc.head)
        except hl7proto.Hl7Error:
            self._framing_error(exc.limit, f"{reason} without a readable MSH")
            return
        self._reject(exc.head, header, reason)

    def _close_for_errors(self, why: str) -> None:
        if self.closed or self._transport is None or self._transport.is_closing():
            return
        self._closing = True
        self._counters.connections_closed_for_errors += 1
        logger.warning("hl7 channel %s: closing connection from %s: %s", self._channel.name, self.remote, why)
        self._flush()
        self._transport.close()

    # ------------------------------------------------------------------ slots and writing

    def _build(self, message: bytes, decision: AckDecision) -> bytes:
        """The MLLP frame of the ACK `decision` describes for `message`."""
        return _frame(hl7proto.build_ack(message, decision.code.value, decision.text, decision.error))

    def _complete_new_slot(self, message: bytes, header: Any, decision: AckDecision | None) -> None:
        slot = _Slot(self, message, header, SlotState.READY)
        if decision is not None:
            slot.ack = self._build(message, decision)
            slot.ack_code = decision.code.value
        else:
            self._counters.acks_suppressed += 1
        self._slots.append(slot)
        self._slot_ready(slot)

    def _complete(self, slot: _Slot, ack: bytes | None, code: str | None) -> None:
        if slot.state is SlotState.READY:
            return
        slot.state = SlotState.READY
        slot.ack = ack
        slot.ack_code = code
        if ack is None:
            self._counters.acks_suppressed += 1
        self._slot_ready(slot)
        self._channel.check_drained()

    def _slot_ready(self, slot: _Slot) -> None:
        if self.closed:
            if slot.ack is not None:
                self._counters.acks_lost += 1  # committed after the device hung up
            return
        if self._in_chunk or self._flush_handle is not None:
            return
        if len(self._slots) == 1:
            self._flush()  # lock-step sender: write at once
        elif self._slots[0] is slot:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write the completed prefix of the ACK FIFO in one transport.write."""
        self._flush_handle = None
        slots = self._slots
        if not slots or slots[0].state is not SlotState.READY:
            return
        out: list[bytes] = []
        counters = self._counters
        while slots and slots[0].state is SlotState.READY:
            slot = slots.popleft()
            if slot.ack is not None:
                out.append(slot.ack)
                if slot.ack_code in _POSITIVE_CODES:
                    counters.acks_positive += 1
                elif slot.ack_code is not None:
                    counters.acks_negative += 1
                else:
                    counters.replies_other += 1
        if not out:
            return
        transport = self._transport
        if transport is None or self.closed or transport.is_closing():
            counters.acks_lost += len(out)
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        counters.bytes_sent += len(data)
        self._last_activity = self._loop.time()
        transport.write(data)

    # ------------------------------------------------------------------ commit

    def slot_committed(self, slot: _Slot, result: CommitResult) -> None:
        """The queue committed (or failed to commit) the slot's message."""
        if slot.state is not SlotState.AWAIT_COMMIT:
            return  # already answered (ORIGINAL timeout before the commit)
        outcome = ackpolicy.classify_commit(result, self._options.duplicate_behavior)
        decision = ackpolicy.commit_ack(self._mode, outcome, result.error, slot.accept_ack_type, slot.app_ack_type)
        if outcome is CommitOutcome.FAILED:
            logger.error("hl7 channel %s: message %s from %s was not stored: %s",
                         self._channel.name, slot.control_id, self.remote, result.error)
        if self._mode is AckMode.ORIGINAL:
            if outcome is CommitOutcome.STORED:
                slot.state = SlotState.AWAIT_REPLY  # the bot's reply (or the timeout) completes it
                return
            self._forget_awaited(slot)
        elif self._mode is AckMode.TWO_PHASE and outcome is CommitOutcome.STORED:
            self._remember_context(slot)
        if decision is None:
            self._complete(slot, None, None)
        else:
            self._complete(slot, self._build(slot.message, decision), decision.code.value)

    # ------------------------------------------------------------------ bot replies

    def _await_reply(self, slot: _Slot) -> None:
        slot.deadline = self._loop.time() + self._options.response_timeout_s
        self._awaiting.setdefault(slot.control_id, deque()).append(slot)
        if self._deadline_timer is None:
            self._deadline_timer = self._loop.call_at(slot.deadline, self._expire_replies)

    def _forget_awaited(self, slot: _Slot) -> None:
        waiting = self._awaiting.get(slot.control_id)
        if waiting is None:
            return
        try:
            waiting.remove(slot)
        except ValueError:
            pass
        if not waiting:
            del self._awaiting[slot.control_id]

    def _expire_replies(self) -> None:
        """ORIGINAL: answer AR for every message whose hub reply is overdue; re-arm."""
        self._deadline_timer = None
        if self.closed:
            return
        now = self._loop.time()
        next_deadline: float | None = None
        timeout = self._options.response_timeout_s
        for slot in list(self._slots):
            if slot.state is SlotState.READY or slot.deadline == 0.0:
                continue
            if slot.deadline > now:
                next_deadline = slot.deadline
                break
            self._counters.replies_timed_out += 1
            logger.warning("hl7 channel %s: no hub response for message %s from %s within %g s; answering AR "
                           "(the message stays queued)", self._channel.name, slot.control_id, self.remote, timeout)
            self._forget_awaited(slot)
            decision = ackpolicy.timeout_ack(timeout, slot.accept_ack_type, slot.app_ack_type)
            if decision is None:
                self._complete(slot, None, None)
            else:
                self._complete(slot, self._build(slot.message, decision), decision.code.value)
        if next_deadline is not None:
            self._deadline_timer = self._loop.call_at(next_deadline, self._expire_replies)

    def _remember_context(self, slot: _Slot) -> None:
        contexts = self._contexts.setdefault(slot.control_id, deque())
        contexts.append(_ReplyContext(slot.message, slot.app_ack_type, slot.charset))
        self._context_count += 1
        if self._context_count > MAX_AWAITED_REPLIES:
            oldest_key = next(iter(self._contexts))
            oldest = self._contexts[oldest_key]
            oldest.popleft()
            if not oldest:
                del self._contexts[oldest_key]
            self._context_count -= 1

    def deliver_reply(self, control_id: str, body: str, status_code: int) -> bool:
        """Route the bot's reply for message `control_id`; True when something was written."""
        counters = self._counters
        if self._mode is AckMode.FAST or self._mode is AckMode.IMMEDIATE:
            counters.replies_suppressed += 1
            return False
        if self._mode is AckMode.ORIGINAL:
            waiting = self._awaiting.get(control_id)
            if not waiting:
                return self._late(control_id)
            slot = waiting[0]
            self._forget_awaited(slot)
            message, app_ack_type, charset = slot.message, slot.app_ack_type, slot.charset
        else:
            contexts = self._contexts.get(control_id)
            if not contexts:
                return self._late(control_id)
            context = contexts.popleft()
            self._context_count -= 1
            if not contexts:
                del self._contexts[control_id]
            slot = None
            message, app_ack_type, charset = context.message, context.app_ack_type, context.charset
        ack, code = self._reply_bytes(message, app_ack_type, charset, body, status_code)
        if slot is not None:
            self._complete(slot, ack, code)
        elif ack is not None:
            new_slot = _Slot(self, message, _NO_HEADER, SlotState.READY)
            new_slot.ack, new_slot.ack_code = ack, code
            self._slots.append(new_slot)
            self._slot_ready(new_slot)
        if ack is None:
            counters.replies_suppressed += 1
            return False
        counters.replies_delivered += 1
        return True

    def _late(self, control_id: str) -> bool:
        self._counters.replies_late += 1
        logger.warning("hl7 channel %s: discarded a late or unexpected hub reply for message %s from %s",
                       self._channel.name, control_id, self.remote)
        return False

    def _reply_bytes(self, message: bytes, app_ack_type: str, charset: str, body: str,
                     status_code: int) -> tuple[bytes | None, str | None]:
        is_hl7, reply_code = ackpolicy.classify_reply(body)
        decision = ackpolicy.reply_decision(self._mode, self._options.app_level_ack, status_code, is_hl7,
                                            reply_code, app_ack_type, None if is_hl7 else body)
        if decision.action is ReplyAction.BUILD_AE:
            text = decision.text or "hub error"
            return self._build(message, AckDecision(AckCode.AE, text, text)), AckCode.AE.value
        if decision.action is not ReplyAction.FORWARD:
            return None, None
        codec = _reply_codec(charset, self._options.encoding)
        try:
            frame = encode(body.encode(codec, "replace"))
        except InvalidPayload:
            text = "the hub's reply contains MLLP control characters (0x0B/0x1C)"
            return self._build(message, AckDecision(AckCode.AE, text, text)), AckCode.AE.value
        return frame, (reply_code.value if reply_code is not None else None)

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
        if self._loop.time() - self._last_activity >= idle and not self._slots and not self._backlog:
            self._counters.connections_idle_closed += 1
            logger.info("hl7 channel %s: closing connection from %s idle for %g s",
                        self._channel.name, self.remote, idle)
            self._transport.close()
            return
        if self._slots or self._backlog:
            self._last_activity = self._loop.time()
        self._arm_idle_timer()

    @property
    def unfinished(self) -> int:
        """Messages on this connection whose ACK is not written yet."""
        return sum(1 for slot in self._slots if slot.state is not SlotState.READY)

    def close(self) -> None:
        """Write what is ready and close the connection."""
        if self._transport is not None and not self._transport.is_closing():
            self._flush()
            self._transport.close()

    def decoder_counters(self) -> tuple[int, int, int]:
        decoder = self._decoder
        return decoder.discarded_bytes, decoder.missing_cr, decoder.truncated_frames


class _NoHeader:
    control_id = ""
    accept_ack_type = ""
    app_ack_type = ""
    charset = ""


_NO_HEADER: Final = _NoHeader()


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
    """An MLLP listener for one channel (see the module docstring)."""

    def __init__(self, name: str, endpoint: Endpoint, options: MllpOptions, sink: InboundSink, *,
                 log_phi: bool = False, sequence_start: int = 0) -> None:
        self.name = name
        self.endpoint = endpoint
        self.options = options
        self.sink = sink
        self.log_phi = log_phi
        self.dedup_policy = DuplicatePolicy[queue_duplicate_policy_name(options.duplicate_behavior)]
        self.counters = _Counters()
        self.reading_paused = False
        self._sequence = sequence_start
        self._server: asyncio.AbstractServer | None = None
        self._connections: dict[str, Hl7Connection] = {}
        self._closed_decoder_totals = [0, 0, 0]
        self._drained: asyncio.Event | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen on the endpoint's host:port (port 0: any free port; see `port`)."""
        if self._server is not None:
            raise RuntimeError(f"hl7 channel {self.name} is already started")
        loop = asyncio.get_running_loop()
        self._stopping = False
        self.reading_paused = False
        try:
            self._server = await loop.create_server(
                lambda: Hl7Connection(self), self.endpoint.host, self.endpoint.port, backlog=512
            )
        except OSError as exc:
            raise OSError(exc.errno, f"hl7 channel {self.name}: cannot listen on "
                                     f"{self.endpoint.host}:{self.endpoint.port}: {exc.strerror}") from exc
        logger.info("hl7 channel %s listening on %s:%d (ack mode %s)", self.name, self.host, self.port,
                    self.options.ack_mode.value)

    @property
    def host(self) -> str:
        return self._first_sockname()[0] if self._server is not None else self.endpoint.host

    @property
    def port(self) -> int:
        """The bound port (the real one when the endpoint asked for port 0)."""
        return int(self._first_sockname()[1]) if self._server is not None else self.endpoint.port

    def _first_sockname(self) -> Any:
        assert self._server is not None
        return self._server.sockets[0].getsockname()

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
        """Register a new connection, or refuse it (maxConnections, stopping)."""
        counters = self.counters
        if self._stopping or len(self._connections) >= self.options.max_connections:
            counters.connections_refused += 1
            logger.warning("hl7 channel %s: refused connection from %s (%s)", self.name, connection.remote,
                           "stopping" if self._stopping else
                           f"maxConnections={self.options.max_connections} reached")
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

    def assign_sequence_number(self, frame: bytes) -> bytes:
        """assignSeqNo: `frame` with MSH-13 set to the next channel sequence number."""
        rewritten = _rewrite_msh_field(frame, 13, str(self._sequence).encode("ascii"))
        if rewritten is None:
            self.counters.seq_no_skipped += 1
            return frame
        self._sequence += 1
        return rewritten

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
        """Counters plus connections open and the decoder totals (closed and live connections)."""
        result: dict[str, Any] = self.counters.as_dict()
        totals = list(self._closed_decoder_totals)
        for connection in self._connections.values():
            for index, value in enumerate(connection.decoder_counters()):
                totals[index] += value
        result["discarded_bytes"], result["missing_cr"], result["truncated_frames"] = totals
        result["connections_open"] = len(self._connections)
        result["acks_pending"] = self._unfinished()
        result["ack_mode"] = self.options.ack_mode.value
        result["reading_paused"] = self.reading_paused
        return result
