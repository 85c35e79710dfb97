# cython: language_level=3, embedsignature=True
"""The per-connection HL7 ACK sequencer, Cython twin of `medagent.proto._hl7session_py`.

The pure module is the specification (its docstring states the theory of operation and the
invariants); this twin must be observably identical: the same events, slots, ACK bytes, counters
and errors for any sequence of calls. Never import it directly; `medagent.proto.hl7_session`
selects it through `medagent._compat.load_fast("_hl7session")`.

Why a twin: per message the pure sequencer spends ~25 µs of Python (attribute dicts, enum
compares, deque methods, the policy calls) around kernels that are already compiled. Here the
classes are cdef classes with typed attributes, the ACK mode is a C int, the FIFO is a list with
a head index, the frames are built with one memcpy, and the header/ACK kernels of
`medagent._fast._hl7` are called directly (never the selector, so a monkeypatched selector does
not change what this twin runs).

What is shared, not duplicated: the result types (`Rejected`, `FramingError`, `ReplyResult`,
`SlotState`), the limits and `rewrite_msh_field` come from the pure module; every ACK decision
is still made by `medagent.proto.ackpolicy`. The only memo is of `ackpolicy.commit_ack` and
`receipt_ack` for outcomes without an error text: those are pure functions of (mode, outcome,
MSH-15, MSH-16) returning frozen decisions, so caching them per session changes nothing visible.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject_GenericSetAttr
from libc.string cimport memchr, memcpy

import dataclasses
from collections import deque

from medagent._fast._hl7 import build_ack as _build_ack
from medagent._fast._hl7 import decode as _decode
from medagent._fast._hl7 import parse_header as _parse_header
from medagent.proto import ackpolicy
from medagent.proto._hl7_py import Hl7Error, codec_for_charset
from medagent.proto._hl7session_py import (
    MAX_AWAITED_REPLIES,
    MAX_CONSECUTIVE_FRAMING_ERRORS,
    FramingError,
    Rejected,
    ReplyResult,
    SlotState,
    rewrite_msh_field,
)
from medagent.proto.ackpolicy import AckCode, AckDecision, AckMode, CommitOutcome, ReplyAction
from medagent.records import InboundRecord

__all__ = ["Hl7CountersC", "Hl7SessionC", "SequenceCounterC", "SlotC"]

# ACK modes as C ints (compared per message instead of enum identity through module globals).
cdef enum:
    M_ORIGINAL = 0
    M_TWO_PHASE = 1
    M_FAST = 2
    M_IMMEDIATE = 3

# Slot states: the values of SlotState (an IntEnum), exposed through SlotC.state.
cdef enum:
    S_AWAIT_COMMIT = 0
    S_AWAIT_REPLY = 1
    S_READY = 2

cdef tuple _STATES = (SlotState.AWAIT_COMMIT, SlotState.AWAIT_REPLY, SlotState.READY)
cdef dict _MODE_CODES = {AckMode.ORIGINAL: M_ORIGINAL, AckMode.TWO_PHASE: M_TWO_PHASE,
                         AckMode.FAST: M_FAST, AckMode.IMMEDIATE: M_IMMEDIATE}
cdef object _STORED = CommitOutcome.STORED
cdef object _BUILD_AE = ReplyAction.BUILD_AE
cdef object _FORWARD = ReplyAction.FORWARD
cdef object _AE = AckCode.AE
cdef object _NO_DECISION = object()  # a memo entry for "no ACK" (None is a valid decision)
#: Memoized ACK decisions per session (distinct outcome x MSH-15 x MSH-16 combinations).
cdef Py_ssize_t _MEMO_LIMIT = 32
#: Compact the FIFO list once this many sent slots sit before its head.
cdef Py_ssize_t _COMPACT_AT = 64


# InboundRecord is a frozen, slotted dataclass: its generated __init__ sets every field through
# object.__setattr__ (~1.9 µs, the largest cost of a receipt). `_new_record` fills the slots
# directly instead, which is what that __init__ does, only when the class has the expected shape
# (the seven positional fields below, plain defaults after them, no __post_init__); otherwise it
# calls the class. Records compare equal either way (the differential tests compare them).
cdef tuple _RECORD_POSITIONAL = ("channel", "remote", "sender", "control_id", "message_type", "body",
                                 "received_at")


def _record_layout():
    fields = dataclasses.fields(InboundRecord)
    names = tuple(f.name for f in fields)
    rest = fields[len(_RECORD_POSITIONAL):]
    if (names[:len(_RECORD_POSITIONAL)] != _RECORD_POSITIONAL or hasattr(InboundRecord, "__post_init__")
            or "__dict__" in dir(InboundRecord)
            or any(f.default is dataclasses.MISSING or not f.init for f in rest)):
        return None
    return names, tuple(f.default for f in rest)


cdef object _RECORD_LAYOUT = _record_layout()


cdef object _new_record(object channel, object remote, object sender, object control_id, object message_type,
                        object body, object received_at):
    if _RECORD_LAYOUT is None:
        return InboundRecord(channel, remote, sender, control_id, message_type, body, received_at)
    cdef tuple names = _RECORD_LAYOUT[0]
    cdef tuple defaults = _RECORD_LAYOUT[1]
    cdef Py_ssize_t i
    record = InboundRecord.__new__(InboundRecord)
    PyObject_GenericSetAttr(record, names[0], channel)
    PyObject_GenericSetAttr(record, names[1], remote)
    PyObject_GenericSetAttr(record, names[2], sender)
    PyObject_GenericSetAttr(record, names[3], control_id)
    PyObject_GenericSetAttr(record, names[4], message_type)
    PyObject_GenericSetAttr(record, names[5], body)
    PyObject_GenericSetAttr(record, names[6], received_at)
    for i in range(len(defaults)):
        PyObject_GenericSetAttr(record, names[7 + i], defaults[i])
    return record


cdef class SequenceCounterC:
    """assignSeqNo's channel-wide MSH-13 counter (shared by the channel's sessions)."""

    cdef public object next

    def __init__(self, start=0):
        self.next = start


cdef class Hl7CountersC:
    """A channel's counters, shared by its sessions (C integers on the hot path).

    Same fields, properties and `as_dict` as the pure `Hl7Counters`.
    """

    INTEGER_FIELDS = (
        "connections_total", "connections_refused", "connections_closed_for_errors", "connections_idle_closed",
        "messages_received", "messages_rejected", "framing_errors",
        "acks_suppressed", "acks_lost", "replies_other", "bytes_received", "bytes_sent", "replies_delivered",
        "replies_suppressed", "replies_late", "replies_no_connection", "replies_timed_out",
        "seq_no_skipped", "discarded_bytes", "missing_cr", "truncated_frames", "sink_errors",
        "control_id_reused",
    )

    cdef public long long connections_total, connections_refused, connections_closed_for_errors
    cdef public long long connections_idle_closed, messages_received, messages_rejected, framing_errors
    cdef public long long acks_suppressed, acks_lost, replies_other, bytes_received, bytes_sent
    cdef public long long replies_delivered, replies_suppressed, replies_late, replies_no_connection
    cdef public long long replies_timed_out, seq_no_skipped, discarded_bytes, missing_cr
    cdef public long long truncated_frames, sink_errors, control_id_reused
    cdef public dict answers
    cdef public list latency
    cdef public tuple latency_bounds

    def __init__(self, latency_bounds=(float("inf"),)):
        self.answers = {}
        self.latency_bounds = tuple(latency_bounds)
        self.latency = [0] * len(latency_bounds)

    @property
    def acks_positive(self):
        """ACKs written with AA or CA."""
        answers = self.answers
        return answers.get("AA", 0) + answers.get("CA", 0)

    @property
    def acks_negative(self):
        """ACKs written with AE, AR, CE or CR."""
        return sum(self.answers.values()) - self.acks_positive

    def as_dict(self):
        result = {name: getattr(self, name) for name in self.INTEGER_FIELDS}
        result["acks_positive"], result["acks_negative"] = self.acks_positive, self.acks_negative
        return result


@cython.final
cdef class SlotC:
    """One message's place in its session's ACK FIFO (see the pure `Slot`).

    ``committed`` is the on-commit callback to hand to the sink with ``record``.
    """

    cdef public Hl7SessionC session
    cdef public object message, control_id, accept_ack_type, app_ack_type, charset
    cdef public object ack, ack_code, record
    cdef public double deadline, received
    cdef int _state

    def __init__(self, Hl7SessionC session, message, control_id, accept_ack_type, app_ack_type, charset,
                 state, double received):
        self.session = session
        self.message = message
        self.control_id = control_id
        self.accept_ack_type = accept_ack_type
        self.app_ack_type = app_ack_type
        self.charset = charset
        self._state = int(state)
        self.received = received

    @property
    def state(self):
        return _STATES[self._state]

    def committed(self, result):
        """The sink's on_commit callback: through the adapter (it logs and writes), else direct."""
        cdef Hl7SessionC session = self.session
        if session.listener is not None:
            session.listener.slot_committed(self, result)
        else:
            session._committed(self, result)


cdef inline SlotC _new_slot(Hl7SessionC session, object message, object control_id, object accept_ack_type,
                            object app_ack_type, object charset, int state, double received):
    cdef SlotC slot = SlotC.__new__(SlotC)
    slot.session = session
    slot.message = message
    slot.control_id = control_id
    slot.accept_ack_type = accept_ack_type
    slot.app_ack_type = app_ack_type
    slot.charset = charset
    slot._state = state
    slot.received = received
    return slot


cdef inline bint _has_control(bytes payload):
    """True when `payload` holds an MLLP start or end block byte (it cannot be framed)."""
    cdef const char* data = PyBytes_AS_STRING(payload)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
    return memchr(data, 0x0B, size) != NULL or memchr(data, 0x1C, size) != NULL


cdef bytes _wrap(bytes payload):
    """SB + payload + EB + CR in one allocation (the caller checked `_has_control`)."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, size + 3)
    cdef char* out = PyBytes_AS_STRING(frame)
    out[0] = 0x0B
    memcpy(out + 1, PyBytes_AS_STRING(payload), size)
    out[size + 1] = 0x1C
    out[size + 2] = 0x0D
    return frame


cdef bytes _frame(bytes payload):
    """MLLP-frame an ACK we built; control bytes (only a reason text can carry them) are dropped."""
    if _has_control(payload):
        payload = payload.replace(b"\x0b", b"").replace(b"\x1c", b"")
    return _wrap(payload)


cdef tuple _build(object message, object decision):
    """(the MLLP frame of the ACK `decision` describes for `message`, its MSA-1 code)."""
    code = decision.code.value
    return _frame(_build_ack(message, code, decision.text, decision.error)), code


cdef tuple _build_coded(object message, tuple entry):
    """`_build` for a memo entry ``(decision, code)`` (the enum's value read once)."""
    decision = entry[0]
    code = entry[1]
    return _frame(_build_ack(message, code, decision.text, decision.error)), code


cdef object _msh_only(bytes frame):
    """The MSH segment of an ASCII-compatible frame (what ACKs need), else the whole frame."""
    cdef const char* data = PyBytes_AS_STRING(frame)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
    cdef const char* end
    if size < 3 or data[0] != b'M' or data[1] != b'S' or data[2] != b'H':
        return frame
    end = <const char*>memchr(data, 0x0D, size)
    if end == NULL:
        return frame
    return PyBytes_FromStringAndSize(data, end - data)


cdef object _reply_codec(object charset, object default):
    """Codec to encode a bot reply with: the original message's MSH-18, else the channel's."""
    if charset:
        try:
            return codec_for_charset(charset)
        except Hl7Error:
            pass
    return default


@cython.final
cdef class Hl7SessionC:
    """The ACK sequencer of one MLLP connection (see the pure `Hl7Session`)."""

    cdef public object options, mode, channel, remote, listener
    cdef public bint durable, closed
    cdef public Py_ssize_t framing_errors_in_row
    cdef public Hl7CountersC counters
    cdef public SequenceCounterC sequence
    cdef int _mode
    cdef bint _assign_seq_no
    cdef double _timeout
    cdef object _encoding, _duplicate_behavior, _app_level_ack
    cdef list _slots  # the FIFO is _slots[_head:]
    cdef Py_ssize_t _head
    cdef dict _awaiting, _contexts, _memo
    cdef Py_ssize_t _context_count

    def __init__(self, options, *, channel="", remote="", Hl7CountersC counters=None,
                 SequenceCounterC sequence=None, listener=None):
        self.options = options
        self.mode = options.ack_mode
        self._mode = _MODE_CODES[options.ack_mode]
        self.durable = self._mode != M_IMMEDIATE
        self.channel = channel
        self.remote = remote
        self.counters = counters if counters is not None else Hl7CountersC()
        self.sequence = sequence if sequence is not None else SequenceCounterC()
        self.listener = listener
        self.closed = False
        self.framing_errors_in_row = 0
        # MllpOptions is frozen: read the settings used per message once.
        self._assign_seq_no = bool(options.assign_seq_no)
        self._timeout = options.response_timeout_s
        self._encoding = options.encoding
        self._duplicate_behavior = options.duplicate_behavior
        self._app_level_ack = options.app_level_ack
        self._slots = []
        self._head = 0
        self._awaiting = {}
        self._contexts = {}
        self._memo = {}
        self._context_count = 0

    # ------------------------------------------------------------------ state

    @property
    def outstanding(self):
        """Slots not yet sent (completed or not)."""
        return len(self._slots) - self._head

    @property
    def unfinished(self):
        """Messages whose ACK is not decided yet."""
        cdef Py_ssize_t i, count = 0
        cdef SlotC slot
        for i in range(self._head, len(self._slots)):
            slot = <SlotC>self._slots[i]
            if slot._state != S_READY:
                count += 1
        return count

    @property
    def writable(self):
        """True when `data_to_send` has something (the FIFO head is completed)."""
        return self._head < len(self._slots) and (<SlotC>self._slots[self._head])._state == S_READY

    def next_deadline(self):
        """The earliest ORIGINAL reply deadline still open (deadlines grow in arrival order)."""
        cdef Py_ssize_t i
        cdef SlotC slot
        for i in range(self._head, len(self._slots)):
            slot = <SlotC>self._slots[i]
            if slot._state != S_READY and slot.deadline:
                return slot.deadline
        return None

    # ------------------------------------------------------------------ intake

    def receive_frame(self, frame, double now, received_at):
        """One decoded frame (or the decoder's FrameTooLarge) at loop time `now` (see the pure twin)."""
        cdef SlotC slot
        cdef Hl7CountersC counters
        if type(frame) is not bytes:
            return self._receive_oversize(frame, now)
        try:
            header = _parse_header(frame)
        except Hl7Error:
            return self._framing_error(len(frame), "no readable MSH segment")
        try:
            _decode(frame, self._encoding)
        except Hl7Error as exc:
            return self._reject(frame, header, str(exc), now)
        counters = self.counters
        self.framing_errors_in_row = 0
        counters.messages_received += 1
        if self._assign_seq_no:
            frame = self._assign_sequence_number(frame)
        control_id = header.control_id
        accept_ack_type = header.accept_ack_type
        app_ack_type = header.app_ack_type
        if self._mode == M_IMMEDIATE:
            slot = _new_slot(self, frame, control_id, accept_ack_type, app_ack_type, header.charset,
                             S_READY, now)
            entry = self._memo_decision(None, accept_ack_type, app_ack_type)
            if entry is None:
                counters.acks_suppressed += 1
            else:
                slot.ack, slot.ack_code = _build_coded(frame, entry)
        elif self._mode == M_ORIGINAL:
            slot = _new_slot(self, frame, control_id, accept_ack_type, app_ack_type, header.charset,
                             S_AWAIT_COMMIT, now)
            slot.deadline = now + self._timeout
            waiting = self._awaiting.get(control_id)
            if waiting is None:
                self._awaiting[control_id] = deque((slot,))
            else:
                waiting.append(slot)
        else:
            slot = _new_slot(self, _msh_only(frame), control_id, accept_ack_type, app_ack_type,
                             header.charset, S_AWAIT_COMMIT, now)
        self._slots.append(slot)
        slot.record = _new_record(
            self.channel,
            self.remote,
            f"{header.sending_application}^{header.sending_facility}",
            control_id,
            header.message_type,
            frame,
            received_at,
        )
        return slot

    cdef object _memo_decision(self, object outcome, object accept_ack_type, object app_ack_type):
        """ackpolicy's decision for a receipt (outcome None) or an error-free commit, memoized
        with its MSA-1 code: ``(decision, code)``, or None for "no ACK"."""
        key = (outcome, accept_ack_type, app_ack_type)
        entry = self._memo.get(key, _NO_DECISION)
        if entry is _NO_DECISION:
            if outcome is None:
                decision = ackpolicy.receipt_ack(self.mode, accept_ack_type, app_ack_type)
            else:
                decision = ackpolicy.commit_ack(self.mode, outcome, None, accept_ack_type, app_ack_type)
            entry = None if decision is None else (decision, decision.code.value)
            if len(self._memo) < _MEMO_LIMIT:  # MSH-15/16 come from the device: bound the memo
                self._memo[key] = entry
        return entry

    cdef object _assign_sequence_number(self, object frame):
        sequence = self.sequence
        rewritten = rewrite_msh_field(frame, 13, str(sequence.next).encode("ascii"))
        if rewritten is None:
            self.counters.seq_no_skipped += 1
            return frame
        sequence.next += 1
        return rewritten

    cdef object _framing_error(self, Py_ssize_t size, str what):
        self.counters.framing_errors += 1
        self.framing_errors_in_row += 1
        return FramingError(size, what, self.framing_errors_in_row >= MAX_CONSECUTIVE_FRAMING_ERRORS)

    cdef object _reject(self, object frame, object header, str reason, double now):
        self.counters.messages_rejected += 1
        decision = ackpolicy.reject_ack(self.mode, reason, header.accept_ack_type, header.app_ack_type)
        cdef SlotC slot = _new_slot(self, frame, header.control_id, header.accept_ack_type,
                                    header.app_ack_type, header.charset, S_READY, now)
        if decision is None:
            self.counters.acks_suppressed += 1
        else:
            slot.ack, slot.ack_code = _build(frame, decision)
        self._slots.append(slot)
        return Rejected(header.control_id, len(frame), reason)

    cdef object _receive_oversize(self, object exc, double now):
        reason = f"message larger than the maximum frame size ({exc.limit} bytes)"
        try:
            header = _parse_header(exc.head)
        except Hl7Error:
            return self._framing_error(exc.limit, f"{reason} without a readable MSH")
        return self._reject(exc.head, header, reason, now)

    # ------------------------------------------------------------------ completion

    cdef void _complete(self, SlotC slot, object ack, object code):
        slot._state = S_READY
        slot.ack = ack
        slot.ack_code = code
        if ack is None:
            self.counters.acks_suppressed += 1
        elif self.closed:
            self.counters.acks_lost += 1  # decided after the device hung up

    cdef void _complete_with(self, SlotC slot, object decision):
        if decision is None:
            self._complete(slot, None, None)
        else:
            ack, code = _build(slot.message, decision)
            self._complete(slot, ack, code)

    def committed(self, SlotC slot, result):
        """The sink committed (or failed to commit) the slot's message."""
        self._committed(slot, result)

    cdef void _committed(self, SlotC slot, object result) except *:
        if slot._state != S_AWAIT_COMMIT:
            return  # already answered (ORIGINAL timeout before the commit)
        if result.control_id_reused:
            self.counters.control_id_reused += 1
        outcome = ackpolicy.classify_commit(result, self._duplicate_behavior)
        if self._mode == M_ORIGINAL:
            if outcome is _STORED:
                slot._state = S_AWAIT_REPLY  # the bot's reply (or the timeout) completes it
                return
            self._forget_awaited(slot)
        elif self._mode == M_TWO_PHASE and outcome is _STORED:
            self._remember_context(slot)
        error = result.error
        if error is None:
            entry = self._memo_decision(outcome, slot.accept_ack_type, slot.app_ack_type)
            if entry is None:
                self._complete(slot, None, None)
            else:
                ack, code = _build_coded(slot.message, entry)
                self._complete(slot, ack, code)
        else:
            self._complete_with(slot, ackpolicy.commit_ack(self.mode, outcome, error, slot.accept_ack_type,
                                                           slot.app_ack_type))

    def expire(self, double now):
        """ORIGINAL: answer AR for every message whose reply is overdue; their control ids."""
        cdef list expired = []
        cdef Py_ssize_t i
        cdef SlotC slot
        for i in range(self._head, len(self._slots)):
            slot = <SlotC>self._slots[i]
            if slot._state == S_READY or not slot.deadline:
                continue
            if slot.deadline > now:
                break
            self.counters.replies_timed_out += 1
            expired.append(slot.control_id)
            self._forget_awaited(slot)
            self._complete_with(slot, ackpolicy.timeout_ack(self.options.response_timeout_s,
                                                            slot.accept_ack_type, slot.app_ack_type))
        return expired

    cdef void _forget_awaited(self, SlotC slot):
        waiting = self._awaiting.get(slot.control_id)
        if waiting is None:
            return
        try:
            waiting.remove(slot)
        except ValueError:
            pass
        if not waiting:
            del self._awaiting[slot.control_id]

    cdef void _remember_context(self, SlotC slot):
        contexts = self._contexts.get(slot.control_id)
        if contexts is None:
            contexts = self._contexts[slot.control_id] = deque()
        contexts.append((slot.message, slot.app_ack_type, slot.charset))
        self._context_count += 1
        if self._context_count > MAX_AWAITED_REPLIES:
            oldest_key = next(iter(self._contexts))
            oldest = self._contexts[oldest_key]
            oldest.popleft()
            if not oldest:
                del self._contexts[oldest_key]
            self._context_count -= 1

    # ------------------------------------------------------------------ bot replies

    def reply(self, control_id, body, status_code=200, now=0.0):
        """Route the bot's reply to message `control_id` (ackpolicy.reply_decision decides)."""
        cdef Hl7CountersC counters = self.counters
        cdef SlotC slot = None
        cdef SlotC new_slot
        if self._mode == M_FAST or self._mode == M_IMMEDIATE:
            counters.replies_suppressed += 1
            return ReplyResult.SUPPRESSED
        if self._mode == M_ORIGINAL:
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
            message, app_ack_type, charset = contexts.popleft()
            self._context_count -= 1
            if not contexts:
                del self._contexts[control_id]
        ack, code = self._reply_bytes(message, app_ack_type, charset, body, status_code)
        if slot is not None:
            self._complete(slot, ack, code)
        elif ack is not None:
            new_slot = _new_slot(self, message, control_id, "", "", charset, S_READY, now)
            new_slot.ack, new_slot.ack_code = ack, code
            self._slots.append(new_slot)
        if ack is None:
            counters.replies_suppressed += 1
            return ReplyResult.SUPPRESSED
        counters.replies_delivered += 1
        return ReplyResult.WRITTEN

    cdef tuple _reply_bytes(self, object message, object app_ack_type, object charset, object body,
                            object status_code):
        is_hl7, reply_code = ackpolicy.classify_reply(body)
        decision = ackpolicy.reply_decision(self.mode, self._app_level_ack, status_code, is_hl7,
                                            reply_code, app_ack_type, None if is_hl7 else body)
        if decision.action is _BUILD_AE:
            text = decision.text or "hub error"
            return _build(message, AckDecision(_AE, text, text))
        if decision.action is not _FORWARD:
            return None, None
        payload = body.encode(_reply_codec(charset, self._encoding), "replace")
        if _has_control(payload):
            text = "the hub's reply contains MLLP control characters (0x0B/0x1C)"
            return _build(message, AckDecision(_AE, text, text))
        return _wrap(payload), (reply_code.value if reply_code is not None else None)

    # ------------------------------------------------------------------ output

    def data_to_send(self, now=None, *, bint lost=False):
        """The framed ACKs of the completed FIFO prefix, removed from the FIFO (b"": none).

        `now` (loop time) feeds the latency histogram. ``lost=True``: the connection cannot
        take them any more; they are counted as lost and b"" is returned.
        """
        cdef list slots = self._slots
        cdef Py_ssize_t head = self._head, size = len(slots), n_bounds, index
        cdef SlotC slot
        cdef Hl7CountersC counters
        cdef dict answers
        cdef list latency, out
        cdef tuple bounds
        cdef double now_ms, elapsed
        cdef bint timed = now is not None
        if head >= size or (<SlotC>slots[head])._state != S_READY:
            return b""
        counters = self.counters
        answers = counters.answers
        latency = counters.latency
        bounds = counters.latency_bounds
        n_bounds = len(bounds)
        if timed:
            now_ms = now
        out = []
        while head < size:
            slot = <SlotC>slots[head]
            if slot._state != S_READY:
                break
            head += 1
            ack = slot.ack
            if ack is None:
                continue
            out.append(ack)
            code = slot.ack_code
            if code is None:
                counters.replies_other += 1
                continue
            answers[code] = answers.get(code, 0) + 1
            if timed:  # bisect_left over the sorted bounds (the last one is infinite)
                elapsed = (now_ms - slot.received) * 1000.0
                index = 0
                while index < n_bounds and <double>bounds[index] < elapsed:
                    index += 1
                latency[index] += 1  # past the last bound: IndexError, as bisect_left's would be
        self._release(head)
        if not out:
            return b""
        if lost:
            counters.acks_lost += len(out)
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        counters.bytes_sent += len(data)
        return data

    cdef void _release(self, Py_ssize_t head):
        """Drop the sent slots: move the head, compact the list when enough sit before it."""
        cdef Py_ssize_t size = len(self._slots)
        if head >= size:
            self._slots = []
            self._head = 0
        elif head >= _COMPACT_AT and head * 2 >= size:
            del self._slots[:head]
            self._head = 0
        else:
            self._head = head

    def close(self):
        """The connection is gone: forget awaited replies; later completions count as lost."""
        self.closed = True
        self._awaiting.clear()
        self._contexts.clear()
        self._context_count = 0
