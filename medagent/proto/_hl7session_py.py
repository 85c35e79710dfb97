"""The per-connection HL7 ACK sequencer, pure-Python specification: which ACK, when, in what order.

Importers use :mod:`medagent.proto.hl7_session`, which selects this module or its Cython twin
(``medagent._fast._hl7session``); the twin must behave exactly as this code does (the differential
tests in tests/proto/test_hl7_session*.py compare them event by event and byte by byte).

Theory of operation
-------------------
One :class:`Hl7Session` per MLLP connection (h11 style: events in, bytes out). The adapter
(:mod:`medagent.channels.hl7`) owns the socket, the MLLP decoder, the timers and the sink; it
feeds every decoded frame to :meth:`Hl7Session.receive_frame` and reports what happened later:

==========================================  =====================================================
adapter calls                                the session
==========================================  =====================================================
``receive_frame(frame, now, received_at)``   reads the MSH (``proto.hl7.parse_header``), checks
                                             the text decodes, applies assignSeqNo, gives the
                                             message a :class:`Slot` in the ACK FIFO and returns
                                             it (``slot.record`` is the InboundRecord to hand to
                                             the sink); or returns :class:`Rejected` (an AR/CR
                                             is queued, nothing to store) or
                                             :class:`FramingError` (no MSH: no ACK possible)
``committed(slot, CommitResult)``            the sink's commit callback (``slot.committed``)
``reply(control_id, body, status_code)``     the bot's ``agent:transmit:response``
``expire(now)``                              ORIGINAL: AR for every reply overdue at ``now``
``data_to_send(now)``                        the framed ACKs of the completed FIFO prefix
``next_deadline()``                          when ``expire`` has work next (None: nothing)
``close()``                                  the connection is gone
==========================================  =====================================================

Which ACK (mode x MSH-15/16 x outcome) is decided by :mod:`medagent.proto.ackpolicy` (HL7 v2.5
ch. 2, 2.9; medplum-protocol.md §4.3); every ACK is built by ``proto.hl7.build_ack`` and
MLLP-framed here (MLLP Release 2: ``VT payload FS CR``).

Slots: a message gets a slot on receipt. A slot is completed by the commit, the bot's reply,
the ORIGINAL timeout, or at once (IMMEDIATE, rejections); it completes *silently* when
MSH-15/16 or ``appLevelAck`` say "no ACK". :meth:`data_to_send` returns only the completed
prefix, so a later message's ACK never overtakes an earlier one's. Two-phase application ACKs
(the bot's reply after the CA) are appended as new completed slots. ORIGINAL keeps the
awaiting slots by control id (FIFO per id: a device may reuse one); TWO_PHASE keeps the reply
context (the MSH the app ACK is built from) after the CA, at most ``MAX_AWAITED_REPLIES``.

assignSeqNo rewrites MSH-13 with the channel-wide :class:`SequenceCounter` before the record is
built (the stored body is the rewritten one); UTF-16/32 frames are stored unchanged (counted).

Invariants
----------
* ACKs leave in the order their messages arrived (per session).
* No AA/CA before the commit was reported, except in IMMEDIATE mode; a storage error never
  yields AA/CA (ackpolicy's invariants).
* A slot completes once; a commit after the ORIGINAL timeout, a second reply, or any
  completion after :meth:`close` changes nothing written (the latter is counted as lost).
* Nothing here does I/O, reads a clock or logs: times come in as arguments, and what deserves a
  log line comes back as an event or a return value.
* Per message the hot path allocates the slot, the record and the ACK bytes, nothing else.
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from medagent.proto import ackpolicy
from medagent.proto import hl7 as hl7proto
from medagent.proto.ackpolicy import AckCode, AckDecision, AckMode, CommitOutcome, ReplyAction
from medagent.proto.mllp import FrameTooLarge, InvalidPayload, encode
from medagent.records import CommitResult, InboundRecord

if TYPE_CHECKING:
    from medagent.channels.endpoint import MllpOptions

__all__ = [
    "MAX_AWAITED_REPLIES",
    "MAX_CONSECUTIVE_FRAMING_ERRORS",
    "FramingError",
    "Hl7Counters",
    "Hl7Session",
    "Rejected",
    "ReplyResult",
    "SequenceCounter",
    "Slot",
    "SlotState",
    "rewrite_msh_field",
]

#: A FramingError asks for the connection to close after this many in a row (no valid message between).
MAX_CONSECUTIVE_FRAMING_ERRORS: Final = 10
#: Two-phase: bot replies awaited per session; beyond it the oldest entry is forgotten.
MAX_AWAITED_REPLIES: Final = 10_000



class SlotState(enum.IntEnum):
    """Where one message's ACK stands in its session."""

    AWAIT_COMMIT = 0
    AWAIT_REPLY = 1  # ORIGINAL: committed, waiting for the bot's reply (or the timeout)
    READY = 2  # completed: `ack` is sent when every earlier slot is ready (None: nothing)


READY: Final = SlotState.READY  # a module global: read per slot on the hot path


class ReplyResult(enum.IntEnum):
    """What :meth:`Hl7Session.reply` did with a bot reply."""

    WRITTEN = 0  # an ACK is queued (behind earlier ones)
    SUPPRESSED = 1  # the mode, appLevelAck or MSH-16 says nothing goes to the device
    LATE = 2  # no message awaits it (late after the timeout, a second reply, or unknown)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message refused before storage (undecodable, unknown charset, oversize); AR/CR queued."""

    control_id: str
    size: int
    reason: str


@dataclass(frozen=True, slots=True)
class FramingError:
    """A frame without a readable MSH: no ACK possible. ``close``: too many in a row."""

    size: int
    what: str
    close: bool


class _CommitListener(Protocol):
    def slot_committed(self, slot: Slot, result: CommitResult) -> None: ...


class SequenceCounter:
    """assignSeqNo's channel-wide MSH-13 counter (shared by the channel's sessions)."""

    __slots__ = ("next",)

    def __init__(self, start: int = 0) -> None:
        self.next = start


class Hl7Counters:
    """A channel's counters, shared by its sessions (plain ints on the hot path).

    ``answers`` counts ACKs written by MSA-1 code; ``latency`` counts accept -> ACK-written
    latencies (ms) per bucket of ``latency_bounds`` (the last bound should be infinity).
    """

    #: The integer counters (what :meth:`as_dict` reports), in report order.
    INTEGER_FIELDS: Final = (
        "connections_total", "connections_refused", "connections_closed_for_errors", "connections_idle_closed",
        "messages_received", "messages_rejected", "framing_errors",
        "acks_suppressed", "acks_lost", "replies_other", "bytes_received", "bytes_sent", "replies_delivered",
        "replies_suppressed", "replies_late", "replies_no_connection", "replies_timed_out",
        "seq_no_skipped", "discarded_bytes", "missing_cr", "truncated_frames", "sink_errors",
        "control_id_reused",
    )
    __slots__ = (*INTEGER_FIELDS, "answers", "latency", "latency_bounds")

    def __init__(self, latency_bounds: tuple[float, ...] = (float("inf"),)) -> None:
        self.connections_total = 0
        self.connections_refused = 0
        self.connections_closed_for_errors = 0
        self.connections_idle_closed = 0
        self.messages_received = 0
        self.messages_rejected = 0
        self.framing_errors = 0
        self.acks_suppressed = 0
        self.acks_lost = 0
        self.replies_other = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.replies_delivered = 0
        self.replies_suppressed = 0
        self.replies_late = 0
        self.replies_no_connection = 0
        self.replies_timed_out = 0
        self.seq_no_skipped = 0
        self.discarded_bytes = 0
        self.missing_cr = 0
        self.truncated_frames = 0
        self.sink_errors = 0
        self.control_id_reused = 0
        self.answers: dict[str, int] = {}
        self.latency_bounds = latency_bounds
        self.latency = [0] * len(latency_bounds)

    @property
    def acks_positive(self) -> int:
        """ACKs written with AA or CA."""
        answers = self.answers
        return answers.get("AA", 0) + answers.get("CA", 0)

    @property
    def acks_negative(self) -> int:
        """ACKs written with AE, AR, CE or CR."""
        return sum(self.answers.values()) - self.acks_positive

    def as_dict(self) -> dict[str, int]:
        result = {name: getattr(self, name) for name in self.INTEGER_FIELDS}
        result["acks_positive"], result["acks_negative"] = self.acks_positive, self.acks_negative
        return result


class Slot:
    """One message's place in its session's ACK FIFO (mutable; lives until its ACK is sent).

    ``committed`` is the on-commit callback to hand to the sink with ``record``.
    """

    __slots__ = (
        "accept_ack_type",
        "ack",
        "ack_code",
        "app_ack_type",
        "charset",
        "control_id",
        "deadline",
        "message",
        "received",
        "record",
        "session",
        "state",
    )

    def __init__(self, session: Hl7Session, message: bytes, control_id: str, accept_ack_type: str,
                 app_ack_type: str, charset: str, state: SlotState, received: float) -> None:
        self.session = session
        self.message = message  # what ACKs are built from (the whole frame, or its MSH)
        self.control_id = control_id
        self.accept_ack_type = accept_ack_type
        self.app_ack_type = app_ack_type
        self.charset = charset
        self.state = state
        self.ack: bytes | None = None
        self.ack_code: str | None = None
        self.deadline = 0.0  # ORIGINAL: when the timeout AR is due (0: none)
        self.received = received
        self.record: InboundRecord | None = None

    def committed(self, result: CommitResult) -> None:
        """The sink's on_commit callback: through the adapter (it logs and writes), else direct."""
        session = self.session
        if session.listener is not None:
            session.listener.slot_committed(self, result)
        else:
            session.committed(self, result)


class _ReplyContext:
    """TWO_PHASE: what is needed to build and filter the bot's later reply."""

    __slots__ = ("app_ack_type", "charset", "message")

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


def rewrite_msh_field(frame: bytes, number: int, value: bytes) -> bytes | None:
    """`frame` with MSH-`number` (>= 2) replaced by `value`; None for UTF-16/32 (wide) frames.

    Only called on frames whose MSH parse_header accepted (HL7 v2.5 2.14.9: MSH-n is the
    (n-1)-th piece of the MSH segment split on MSH-1).
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


def _build(message: bytes, decision: AckDecision) -> tuple[bytes, str]:
    """(the MLLP frame of the ACK `decision` describes for `message`, its MSA-1 code)."""
    code = decision.code.value  # an enum property: read once per ACK
    return _frame(hl7proto.build_ack(message, code, decision.text, decision.error)), code


def _reply_codec(charset: str, default: str) -> str:
    """Codec to encode a bot reply with: the original message's MSH-18, else the channel's."""
    if charset:
        try:
            return hl7proto.codec_for_charset(charset)
        except hl7proto.Hl7Error:
            pass
    return default


class Hl7Session:
    """The ACK sequencer of one MLLP connection (see the module docstring)."""

    def __init__(self, options: MllpOptions, *, channel: str = "", remote: str = "",
                 counters: Hl7Counters | None = None, sequence: SequenceCounter | None = None,
                 listener: _CommitListener | None = None) -> None:
        self.options = options
        self.mode: AckMode = options.ack_mode
        self.durable = options.ack_mode is not AckMode.IMMEDIATE
        self.channel = channel
        self.remote = remote
        self.counters = counters if counters is not None else Hl7Counters()
        self.sequence = sequence if sequence is not None else SequenceCounter()
        self.listener = listener
        self.closed = False
        self.framing_errors_in_row = 0
        self._slots: deque[Slot] = deque()
        self._awaiting: dict[str, deque[Slot]] = {}  # ORIGINAL: control id -> slots awaiting reply
        self._contexts: dict[str, deque[_ReplyContext]] = {}  # TWO_PHASE: control id -> contexts
        self._context_count = 0

    # ------------------------------------------------------------------ state

    @property
    def outstanding(self) -> int:
        """Slots not yet sent (completed or not)."""
        return len(self._slots)

    @property
    def unfinished(self) -> int:
        """Messages whose ACK is not decided yet."""
        return sum(1 for slot in self._slots if slot.state is not SlotState.READY)

    @property
    def writable(self) -> bool:
        """True when :meth:`data_to_send` has something (the FIFO head is completed)."""
        slots = self._slots
        return bool(slots) and slots[0].state is SlotState.READY

    def next_deadline(self) -> float | None:
        """The earliest ORIGINAL reply deadline still open (deadlines grow in arrival order)."""
        for slot in self._slots:
            if slot.state is not SlotState.READY and slot.deadline:
                return slot.deadline
        return None

    # ------------------------------------------------------------------ intake

    def receive_frame(self, frame: bytes | FrameTooLarge, now: float,
                      received_at: float) -> Slot | Rejected | FramingError:
        """One decoded frame (or the decoder's FrameTooLarge) at loop time `now`.

        `received_at` is the wall-clock time for the record. An accepted message returns its
        Slot: hand ``slot.record`` to the sink (durable unless IMMEDIATE, with ``slot.committed``).
        """
        if type(frame) is not bytes:
            return self._receive_oversize(frame, now)  # type: ignore[arg-type]
        try:
            header = hl7proto.parse_header(frame)
        except hl7proto.Hl7Error:
            return self._framing_error(len(frame), "no readable MSH segment")
        options = self.options
        try:
            hl7proto.decode(frame, options.encoding)
        except hl7proto.Hl7Error as exc:
            return self._reject(frame, header, str(exc), now)
        counters = self.counters
        self.framing_errors_in_row = 0
        counters.messages_received += 1
        if options.assign_seq_no:
            frame = self._assign_sequence_number(frame)
        mode = self.mode
        control_id = header.control_id
        accept_ack_type = header.accept_ack_type
        app_ack_type = header.app_ack_type
        if mode is AckMode.IMMEDIATE:
            slot = Slot(self, frame, control_id, accept_ack_type, app_ack_type, header.charset,
                        SlotState.READY, now)
            decision = ackpolicy.receipt_ack(mode, accept_ack_type, app_ack_type)
            if decision is None:
                counters.acks_suppressed += 1
            else:
                slot.ack, slot.ack_code = _build(frame, decision)
        else:
            original = mode is AckMode.ORIGINAL
            slot = Slot(self, frame if original else _msh_only(frame), control_id, accept_ack_type,
                        app_ack_type, header.charset, SlotState.AWAIT_COMMIT, now)
            if original:
                slot.deadline = now + options.response_timeout_s
                waiting = self._awaiting.get(control_id)
                if waiting is None:
                    self._awaiting[control_id] = deque((slot,))
                else:
                    waiting.append(slot)
        self._slots.append(slot)
        slot.record = InboundRecord(
            self.channel,
            self.remote,
            f"{header.sending_application}^{header.sending_facility}",
            control_id,
            header.message_type,
            frame,
            received_at,
        )
        return slot

    def _assign_sequence_number(self, frame: bytes) -> bytes:
        sequence = self.sequence
        rewritten = rewrite_msh_field(frame, 13, str(sequence.next).encode("ascii"))
        if rewritten is None:
            self.counters.seq_no_skipped += 1
            return frame
        sequence.next += 1
        return rewritten

    def _framing_error(self, size: int, what: str) -> FramingError:
        self.counters.framing_errors += 1
        self.framing_errors_in_row += 1
        return FramingError(size, what, self.framing_errors_in_row >= MAX_CONSECUTIVE_FRAMING_ERRORS)

    def _reject(self, frame: bytes, header: Any, reason: str, now: float) -> Rejected:
        self.counters.messages_rejected += 1
        decision = ackpolicy.reject_ack(self.mode, reason, header.accept_ack_type, header.app_ack_type)
        slot = Slot(self, frame, header.control_id, header.accept_ack_type, header.app_ack_type,
                    header.charset, SlotState.READY, now)
        if decision is None:
            self.counters.acks_suppressed += 1
        else:
            slot.ack, slot.ack_code = _build(frame, decision)
        self._slots.append(slot)
        return Rejected(header.control_id, len(frame), reason)

    def _receive_oversize(self, exc: FrameTooLarge, now: float) -> Rejected | FramingError:
        reason = f"message larger than the maximum frame size ({exc.limit} bytes)"
        try:
            header = hl7proto.parse_header(exc.head)
        except hl7proto.Hl7Error:
            return self._framing_error(exc.limit, f"{reason} without a readable MSH")
        return self._reject(exc.head, header, reason, now)

    # ------------------------------------------------------------------ completion

    def _complete(self, slot: Slot, ack: bytes | None, code: str | None) -> None:
        slot.state = READY
        slot.ack = ack
        slot.ack_code = code
        if ack is None:
            self.counters.acks_suppressed += 1
        elif self.closed:
            self.counters.acks_lost += 1  # decided after the device hung up

    def committed(self, slot: Slot, result: CommitResult) -> None:
        """The sink committed (or failed to commit) the slot's message."""
        if slot.state is not SlotState.AWAIT_COMMIT:
            return  # already answered (ORIGINAL timeout before the commit)
        if result.control_id_reused:
            self.counters.control_id_reused += 1
        mode = self.mode
        outcome = ackpolicy.classify_commit(result, self.options.duplicate_behavior)
        if mode is AckMode.ORIGINAL:
            if outcome is CommitOutcome.STORED:
                slot.state = SlotState.AWAIT_REPLY  # the bot's reply (or the timeout) completes it
                return
            self._forget_awaited(slot)
        elif mode is AckMode.TWO_PHASE and outcome is CommitOutcome.STORED:
            self._remember_context(slot)
        decision = ackpolicy.commit_ack(mode, outcome, result.error, slot.accept_ack_type, slot.app_ack_type)
        if decision is None:
            self._complete(slot, None, None)
        else:
            self._complete(slot, *_build(slot.message, decision))

    def expire(self, now: float) -> list[str]:
        """ORIGINAL: answer AR for every message whose reply is overdue; their control ids."""
        expired: list[str] = []
        timeout = self.options.response_timeout_s
        for slot in self._slots:
            if slot.state is SlotState.READY or not slot.deadline:
                continue
            if slot.deadline > now:
                break
            self.counters.replies_timed_out += 1
            expired.append(slot.control_id)
            self._forget_awaited(slot)
            decision = ackpolicy.timeout_ack(timeout, slot.accept_ack_type, slot.app_ack_type)
            if decision is None:
                self._complete(slot, None, None)
            else:
                self._complete(slot, *_build(slot.message, decision))
        return expired

    def _forget_awaited(self, slot: Slot) -> None:
        waiting = self._awaiting.get(slot.control_id)
        if waiting is None:
            return
        try:
            waiting.remove(slot)
        except ValueError:
            pass
        if not waiting:
            del self._awaiting[slot.control_id]

    def _remember_context(self, slot: Slot) -> None:
        contexts = self._contexts.get(slot.control_id)
        if contexts is None:
            contexts = self._contexts[slot.control_id] = deque()
        contexts.append(_ReplyContext(slot.message, slot.app_ack_type, slot.charset))
        self._context_count += 1
        if self._context_count > MAX_AWAITED_REPLIES:
            oldest_key = next(iter(self._contexts))
            oldest = self._contexts[oldest_key]
            oldest.popleft()
            if not oldest:
                del self._contexts[oldest_key]
            self._context_count -= 1

    # ------------------------------------------------------------------ bot replies

    def reply(self, control_id: str, body: str, status_code: int = 200, now: float = 0.0) -> ReplyResult:
        """Route the bot's reply to message `control_id` (ackpolicy.reply_decision decides)."""
        counters = self.counters
        mode = self.mode
        if mode is AckMode.FAST or mode is AckMode.IMMEDIATE:
            counters.replies_suppressed += 1
            return ReplyResult.SUPPRESSED
        slot: Slot | None = None
        if mode is AckMode.ORIGINAL:
            waiting = self._awaiting.get(control_id)
            if not waiting:
                counters.replies_late += 1
                return ReplyResult.LATE
            slot = waiting[0]
            self._forget_awaited(slot)
            message, app_ack_type, charset = slot.message, slot.app_ack_type, slot.charset
        else:
            contexts = self._contexts.get(control_id)
            if not contexts:
                counters.replies_late += 1
                return ReplyResult.LATE
            context = contexts.popleft()
            self._context_count -= 1
            if not contexts:
                del self._contexts[control_id]
            message, app_ack_type, charset = context.message, context.app_ack_type, context.charset
        ack, code = self._reply_bytes(message, app_ack_type, charset, body, status_code)
        if slot is not None:
            self._complete(slot, ack, code)
        elif ack is not None:
            new_slot = Slot(self, message, control_id, "", "", charset, SlotState.READY, now)
            new_slot.ack, new_slot.ack_code = ack, code
            self._slots.append(new_slot)
        if ack is None:
            counters.replies_suppressed += 1
            return ReplyResult.SUPPRESSED
        counters.replies_delivered += 1
        return ReplyResult.WRITTEN

    def _reply_bytes(self, message: bytes, app_ack_type: str, charset: str, body: str,
                     status_code: int) -> tuple[bytes | None, str | None]:
        options = self.options
        is_hl7, reply_code = ackpolicy.classify_reply(body)
        decision = ackpolicy.reply_decision(self.mode, options.app_level_ack, status_code, is_hl7,
                                            reply_code, app_ack_type, None if is_hl7 else body)
        if decision.action is ReplyAction.BUILD_AE:
            text = decision.text or "hub error"
            return _build(message, AckDecision(AckCode.AE, text, text))
        if decision.action is not ReplyAction.FORWARD:
            return None, None
        codec = _reply_codec(charset, options.encoding)
        try:
            frame = encode(body.encode(codec, "replace"))
        except InvalidPayload:
            text = "the hub's reply contains MLLP control characters (0x0B/0x1C)"
            return _build(message, AckDecision(AckCode.AE, text, text))
        return frame, (reply_code.value if reply_code is not None else None)

    # ------------------------------------------------------------------ output

    def data_to_send(self, now: float | None = None, *, lost: bool = False) -> bytes:
        """The framed ACKs of the completed FIFO prefix, removed from the FIFO (b"": none).

        `now` (loop time) feeds the latency histogram. ``lost=True``: the connection cannot
        take them any more; they are counted as lost and b"" is returned.
        """
        slots = self._slots
        if not slots or slots[0].state is not READY:
            return b""
        out: list[bytes] = []
        counters = self.counters
        answers = counters.answers
        latency = counters.latency
        bounds = counters.latency_bounds
        while slots and slots[0].state is READY:
            slot = slots.popleft()
            ack = slot.ack
            if ack is None:
                continue
            out.append(ack)
            code = slot.ack_code
            if code is None:
                counters.replies_other += 1
                continue
            answers[code] = answers.get(code, 0) + 1
            if now is not None:  # the last bound is infinite, so the index is in range
                latency[bisect_left(bounds, (now - slot.received) * 1000.0)] += 1
        if not out:
            return b""
        if lost:
            counters.acks_lost += len(out)
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        counters.bytes_sent += len(data)
        return data

    def close(self) -> None:
        """The connection is gone: forget awaited replies; later completions count as lost."""
        self.closed = True
        self._awaiting.clear()
        self._contexts.clear()
        self._context_count = 0
