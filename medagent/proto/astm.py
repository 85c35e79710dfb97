"""ASTM E1381 (CLSI LIS01-A2) link layer and E1394 (CLSI LIS02-A2) records, sans-I/O.

Standards: CLSI LIS01-A2 (formerly ASTM E1381-02) "Low-Level Protocol to Transfer Messages
Between Clinical Laboratory Instruments and Computer Systems", §6 (data link layer); CLSI
LIS02-A2 (formerly ASTM E1394-97) "Information Transfer Between Clinical Instruments and
Computer Systems", §5-§6 (message and record structure, delimiters declared in the header).

Theory of operation
-------------------
:class:`AstmLink` is one side of one link (a TCP connection or a serial line). It never does
I/O and never reads a clock: the adapter feeds it bytes (:meth:`AstmLink.feed`), commit
outcomes (:meth:`AstmLink.commit_done`), outbound messages (:meth:`AstmLink.send`) and the time
(``now``, any monotonic clock, and :meth:`AstmLink.on_timer` at :attr:`AstmLink.deadline`), and
writes out the :class:`Write` events it gets back, in order. Every method returns a list of
events.

The link has three phases (LIS01-A2 §6.1): *establishment* (ENQ answered by ACK or NAK),
*transfer* (frames, each answered by ACK or NAK) and *termination* (EOT). Its states::

    NEUTRAL --ENQ in / ACK out------------------> RECEIVING --EOT in--> NEUTRAL
       |                                            |    ^  final frame of an E1394 message
       |                                            v    |  (its L record) -> MessageReceived
       |                                          COMMITTING --commit_done: ACK (ok) / NAK--+
       +--send(): ENQ out--> ESTABLISHING --ACK in--> SENDING --last ACK: EOT out--> NEUTRAL
                                |  NAK in: busy, retry after 10 s (§6.2.5)
                                |  ENQ in: contention (§6.2.7), see below
                                +  timeout 15 s: EOT out, retry later (§6.5.1)

Receiver (§6.3.4-§6.3.5): a frame is ``STX FN text ETB|ETX C1 C2 CR LF``; FN is the frame
number, the ASCII digit 1..7,0 (the first frame of a session is 1, then modulo 8); C1 C2 is
the checksum, the sum of the bytes from FN through ETB/ETX modulo 256 in two upper-case hex
digits (§6.3.1.4, lower case accepted). A good frame with the expected FN is ACKed and its
text appended; a good frame repeating the previous FN (the sender missed our ACK) is ACKed and
*not* appended (§6.3.4.2); a bad checksum, a malformed frame or any other FN is NAKed, and the
sender retransmits. Bytes outside frames are line noise: counted (``noise_bytes``), ignored.
EOT ends the session (§6.4). A frame whose text exceeds ``max_frame_size`` is NAKed.

Messages: the text of the frames is the E1394 record stream, each record terminated by CR
(LIS02-A2 §5.1). When an ETX frame completes a record stream whose last record is the message
terminator ``L`` (LIS02-A2 §6.12), the message is complete: :class:`MessageReceived` carries
the records, one per line (``\\n``), frame numbers and checksums removed, and the link waits in
COMMITTING *without answering that final frame*: its ACK is written by
``commit_done(token, ok=True)`` (the message is durable), a NAK by ``ok=False`` (the sender
retransmits the frame, which yields the message again). That is the whole durability promise
of an ASTM channel: the instrument sees the final ACK only for a stored message. Bytes that
arrive while committing are held and processed after the answer.

EOT (or a timeout) in the middle of a message discards the incomplete message
(:class:`MessageDiscarded`, §6.5.2: "the receiver shall discard the last incomplete message")
unless ``deliver_incomplete`` is set, in which case the records so far are delivered as a
:class:`MessageReceived` with ``complete=False`` (no link answer depends on its commit: the
session is already over).

Sender (§6.3.2, §6.3.5): :meth:`AstmLink.send` queues an E1394 message (record text, records
separated by CR and/or LF). From NEUTRAL the link writes ENQ; on ACK it writes the frames, one
record per ETX frame, records longer than 240 characters split into ETB frames (§6.3.1.2: at
most 247 characters per frame), waiting for the answer to each. ACK (or EOT, a receiver
interrupt request, §6.3.5.3, which this sender honours by finishing the message) advances; NAK
or any other character retransmits the frame (§6.3.5.2); after ``max_attempts`` (6) sends
of one frame the message is aborted with EOT (:class:`SendResult` ``ok=False``). No answer within
15 s aborts too (§6.5.1). A completed message ends with EOT and ``SendResult(ok=True)``.

Contention (§6.2.7): both sides wrote ENQ. The *instrument* has priority. A link built with
``instrument=False`` (the computer system; medagent's channels) stops, returns to NEUTRAL
without answering, waits for the instrument's ENQ and retries its own ENQ no sooner than 20 s
later. ``instrument=True`` (test peers and load generators playing an analyzer) waits 1 s and
sends ENQ again.

Timers (§6.5.1), as deadlines in ``now`` units: 15 s for an answer to ENQ or to a frame
(``establishment``, ``reply``; the receiver also answers a final frame within ``reply``: when
the commit is slower, it NAKs and the commit's late outcome is ignored — a durable message is
then stored again when resent, and the queue's dedup drops the copy), 30 s between frames for
a receiver (``frame``), 10 s after a busy NAK (``busy_retry``), 20 s / 1 s after contention.

Invariants
----------
* The events produced do not depend on how the input is cut into chunks (tested with
  hypothesis over random chunkings).
* No positive answer to the final frame of a message before ``commit_done(..., ok=True)``.
* Every frame this link writes has a valid checksum and the next frame number.
* Payload bytes never appear in :class:`Notice` details (PHI); only sizes and codes.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ACK",
    "CR",
    "ENQ",
    "EOT",
    "ETB",
    "ETX",
    "LF",
    "NAK",
    "STX",
    "AstmDelimiters",
    "AstmLink",
    "AstmRecord",
    "AstmTimers",
    "Event",
    "LinkState",
    "MessageDiscarded",
    "MessageReceived",
    "Notice",
    "SendResult",
    "Write",
    "build_frame",
    "checksum",
    "frames_for_message",
    "header_identity",
    "parse_records",
    "split_records",
]

STX: Final = 0x02
ETX: Final = 0x03
EOT: Final = 0x04
ENQ: Final = 0x05
ACK: Final = 0x06
LF: Final = 0x0A
CR: Final = 0x0D
NAK: Final = 0x15
ETB: Final = 0x17

#: LIS01-A2 §6.3.1.2: a frame holds at most 247 characters, 7 of them framing.
MAX_FRAME_TEXT: Final = 240
_FRAME_DIGITS: Final = b"01234567"
_ACK_B: Final = bytes([ACK])
_NAK_B: Final = bytes([NAK])
_ENQ_B: Final = bytes([ENQ])
_EOT_B: Final = bytes([EOT])
_RESTART: Final = (STX, EOT, ENQ)  # bytes that never occur inside a frame (§6.3.1.3)
_RECORD_SPLIT = re.compile(rb"\r\n|\r|\n")


class LinkState(enum.IntEnum):
    NEUTRAL = 0
    RECEIVING = 1  # ENQ accepted; waiting for frames or EOT
    COMMITTING = 2  # final frame of a message held until commit_done
    ESTABLISHING = 3  # our ENQ written; waiting for ACK/NAK
    SENDING = 4  # a frame written; waiting for its answer


@dataclass(frozen=True, slots=True)
class AstmTimers:
    """LIS01-A2 §6.5.1 timers in seconds (the adapter's clock units)."""

    establishment: float = 15.0
    reply: float = 15.0
    frame: float = 30.0
    busy_retry: float = 10.0
    contention_retry: float = 20.0
    instrument_contention_retry: float = 1.0


@dataclass(frozen=True, slots=True)
class Write:
    """Bytes to write to the line, in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A complete E1394 message: ``body`` is its records, each followed by ``\\n``.

    Answer with ``commit_done(token, ok)`` when ``complete`` (its final frame awaits the
    answer); an incomplete delivery (``deliver_incomplete``) needs no answer.
    """

    token: int
    body: bytes
    records: int
    complete: bool = True


@dataclass(frozen=True, slots=True)
class MessageDiscarded:
    """An incomplete message was thrown away (EOT/timeout mid-message, or too large)."""

    reason: str
    records: int


@dataclass(frozen=True, slots=True)
class SendResult:
    """Outcome of one :meth:`AstmLink.send`."""

    message_id: int
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Notice:
    """Something worth a counter or a log line: ``kind`` is a short code, ``detail`` no PHI.

    Kinds: checksum, malformed, oversize, bad-frame-number, repeated, nak, contention,
    busy, timeout, abort, commit-timeout, commit-failed.
    """

    kind: str
    detail: str = ""


Event = Write | MessageReceived | MessageDiscarded | SendResult | Notice


def checksum(body: bytes) -> bytes:
    """LIS01-A2 §6.3.1.4: sum of FN..ETB/ETX modulo 256, two upper-case hex digits."""
    return b"%02X" % (sum(body) & 0xFF)


def build_frame(number: int, text: bytes, final: bool) -> bytes:
    """One frame ``STX FN text ETX|ETB C1 C2 CR LF`` (LIS01-A2 §6.3.1)."""
    body = b"%d" % (number % 8) + text + bytes([ETX if final else ETB])
    return bytes([STX]) + body + checksum(body) + b"\r\n"


def split_records(text: bytes) -> list[bytes]:
    """Records of an E1394 text (separated by CR, LF or CRLF), empty lines dropped."""
    return [record for record in _RECORD_SPLIT.split(text) if record]


def frames_for_message(text: bytes, first_number: int = 1, max_text: int = MAX_FRAME_TEXT) -> list[bytes]:
    """The frames of one message: one ETX frame per record (its CR included), records over
    ``max_text`` bytes split into ETB frames first (LIS01-A2 §6.3.1.2)."""
    frames: list[bytes] = []
    number = first_number
    for record in split_records(text):
        data = record + b"\r"
        for start in range(0, len(data), max_text):
            piece = data[start : start + max_text]
            frames.append(build_frame(number, piece, start + max_text >= len(data)))
            number = (number + 1) % 8
    return frames


# --------------------------------------------------------------------------- the link


class AstmLink:
    """One end of an E1381 link (see the module docstring for the rules)."""

    def __init__(
        self,
        *,
        instrument: bool = False,
        timers: AstmTimers = AstmTimers(),
        max_frame_size: int = 64 * 1024,
        max_message_size: int = 8 * 1024 * 1024,
        max_attempts: int = 6,
        deliver_incomplete: bool = False,
    ) -> None:
        if max_frame_size < 1 or max_message_size < 1 or max_attempts < 1:
            raise ValueError("sizes and max_attempts must be positive")
        self.instrument = instrument
        self.timers = timers
        self.max_frame_size = max_frame_size
        self.max_message_size = max_message_size
        self.max_attempts = max_attempts
        self.deliver_incomplete = deliver_incomplete
        self.state = LinkState.NEUTRAL
        self.deadline: float | None = None
        self._in = bytearray()
        #: bytes outside frames and sessions (line noise), ignored (a counter: its events
        #: would depend on chunking)
        self.noise_bytes = 0
        # receiver
        self._expected = 1
        self._accepted_any = False
        self._text = bytearray()  # text of the current message's accepted frames
        self._pending_final = b""  # text of the final frame awaiting commit
        self._token = 0
        self._discarding_frame = False  # inside an oversize frame, skipping to its end
        self._skip_tail = 0  # trailer bytes of an oversize frame still to drop
        # sender
        self._outbox: deque[tuple[int, bytes]] = deque()
        self._next_id = 0
        self._frames: list[bytes] = []
        self._frame_index = 0
        self._attempts = 0
        self._establish_attempts = 0
        self._retry_at: float | None = None

    # ------------------------------------------------------------------ adapter API

    @property
    def busy(self) -> bool:
        """True while a session is open in either direction."""
        return self.state is not LinkState.NEUTRAL

    @property
    def pending_sends(self) -> int:
        return len(self._outbox)

    def feed(self, data: bytes, now: float) -> list[Event]:
        """Bytes from the line. Returns what to write and what happened."""
        out: list[Event] = []
        self._in += data
        if self.state is LinkState.COMMITTING and len(self._in) > self.max_frame_size + 16:
            # A sender must wait for our answer; one that keeps talking cannot make us buffer
            # without bound. Its excess is line noise.
            self.noise_bytes += len(self._in) - self.max_frame_size - 16
            del self._in[self.max_frame_size + 16 :]
        self._pump(now, out)
        return out

    def send(self, text: bytes, now: float) -> tuple[int, list[Event]]:
        """Queue one E1394 message for the instrument; returns its id (see SendResult)."""
        if not split_records(text):
            raise ValueError("an ASTM message needs at least one record")
        message_id = self._next_id = self._next_id + 1
        self._outbox.append((message_id, bytes(text)))
        out: list[Event] = []
        self._maybe_establish(now, out)
        return message_id, out

    def cancel(self, message_id: int, now: float) -> list[Event]:
        """Withdraw a queued message (the caller stopped waiting). One being sent is aborted
        with EOT (§6.3.5.3: the sender may end the transfer); either way a SendResult follows."""
        out: list[Event] = []
        position = next((i for i, (mid, _) in enumerate(self._outbox) if mid == message_id), None)
        if position is None:
            return out
        if position == 0 and self.state in (LinkState.ESTABLISHING, LinkState.SENDING):
            self._abort_send(now, out, "cancelled")
            return out
        del self._outbox[position]
        out.append(SendResult(message_id, False, "cancelled"))
        if not self._outbox and self.state is LinkState.NEUTRAL:
            self._retry_at = None
            self.deadline = None
        return out

    def commit_done(self, token: int, ok: bool, now: float) -> list[Event]:
        """The outcome of committing the MessageReceived with ``token``."""
        out: list[Event] = []
        if self.state is not LinkState.COMMITTING or token != self._token:
            return out  # stale: answered by the reply timeout, or the session ended
        if ok:
            self._text.clear()
            self._advance_frame_number()
            out.append(Write(_ACK_B))
        else:
            out.append(Notice("commit-failed"))
            out.append(Write(_NAK_B))
        self._pending_final = b""
        self.state = LinkState.RECEIVING
        self.deadline = now + self.timers.frame
        self._pump(now, out)
        return out

    def on_timer(self, now: float) -> list[Event]:
        """Call at (or after) :attr:`deadline`; does nothing before it."""
        out: list[Event] = []
        if self.deadline is None or now < self.deadline:
            return out
        state = self.state
        if state is LinkState.RECEIVING:
            out.append(Notice("timeout", "no frame from the sender within the frame timer"))
            self._end_receive(now, out, "receiver timeout")
        elif state is LinkState.COMMITTING:
            out.append(Notice("commit-timeout", "commit slower than the reply timer; NAK"))
            self._pending_final = b""
            self._token += 1
            out.append(Write(_NAK_B))
            self.state = LinkState.RECEIVING
            self.deadline = now + self.timers.frame
            self._pump(now, out)
        elif state is LinkState.ESTABLISHING:
            out.append(Notice("timeout", "no answer to ENQ"))
            out.append(Write(_EOT_B))
            self._establish_failed(now, out, self.timers.busy_retry, "no answer to ENQ")
        elif state is LinkState.SENDING:
            out.append(Notice("timeout", "no answer to a frame"))
            self._abort_send(now, out, "no answer to frame within the reply timer")
        else:  # NEUTRAL: a retry is due
            self._retry_at = None
            self.deadline = None
            self._maybe_establish(now, out)
        return out

    def connection_lost(self, now: float) -> list[Event]:
        """The line is gone: fail queued sends, discard an incomplete message."""
        out: list[Event] = []
        if self._text and self.state is not LinkState.COMMITTING:  # (a committing message is in the sink)
            out.append(MessageDiscarded("connection lost", self._record_count()))
        self._text.clear()
        self._pending_final = b""
        self._token += 1
        for message_id, _ in self._outbox:
            out.append(SendResult(message_id, False, "connection lost"))
        self._outbox.clear()
        self._frames = []
        self._in.clear()
        self.state = LinkState.NEUTRAL
        self.deadline = None
        self._retry_at = None
        return out

    # ------------------------------------------------------------------ input pump

    def _pump(self, now: float, out: list[Event]) -> None:
        while self._in:
            state = self.state
            if state is LinkState.COMMITTING:
                return  # held until the final frame is answered
            if state is LinkState.RECEIVING:
                if not self._receive_step(now, out):
                    return
            else:
                byte = self._in[0]
                del self._in[0]
                self._control_byte(byte, now, out)

    def _control_byte(self, byte: int, now: float, out: list[Event]) -> None:
        """A byte while NEUTRAL, ESTABLISHING or SENDING (no frame is expected from the peer)."""
        state = self.state
        if state is LinkState.NEUTRAL:
            if byte == ENQ:
                self._begin_receive(now, out)
            else:
                self.noise_bytes += 1
        elif state is LinkState.ESTABLISHING:
            if byte == ACK:
                self._establish_attempts = 0
                self._frame_index = 0
                self._attempts = 0
                self._write_frame(now, out)
            elif byte == NAK:
                out.append(Notice("busy", "receiver answered ENQ with NAK"))
                self._establish_failed(now, out, self.timers.busy_retry, "receiver busy (NAK)")
            elif byte == ENQ:
                self._contention(now, out)
            else:
                self.noise_bytes += 1
        elif state is LinkState.SENDING:
            if byte in (ACK, EOT):
                self._frame_index += 1
                self._attempts = 0
                if self._frame_index < len(self._frames):
                    self._write_frame(now, out)
                else:
                    message_id, _ = self._outbox.popleft()
                    out.append(Write(_EOT_B))
                    out.append(SendResult(message_id, True))
                    self._frames = []
                    self._to_neutral(now, out)
            else:
                # §6.3.5.2: NAK "or any character other than ACK or EOT" means: send it again.
                out.append(Notice("nak", "frame not accepted"))
                if self._attempts >= self.max_attempts:
                    self._abort_send(now, out, f"frame not accepted after {self.max_attempts} attempts")
                else:
                    self._write_frame(now, out)

    def _receive_step(self, now: float, out: list[Event]) -> bool:
        """Consume input while RECEIVING; False when more bytes are needed."""
        buf = self._in
        if self._skip_tail:
            # C1 C2 CR LF of an oversize frame (up to the next control byte)
            count = 0
            while count < self._skip_tail and count < len(buf) and buf[count] not in _RESTART:
                count += 1
            del buf[:count]
            self._skip_tail = 0 if buf else self._skip_tail - count
            return bool(buf)
        if self._discarding_frame:
            stop, is_end = _frame_stop(buf, 0)
            if stop < 0:
                del buf[:]
                return False
            self._oversize(buf, stop, is_end, now, out)
            return True
        byte = buf[0]
        if byte == EOT:
            del buf[0]
            self._end_receive(now, out, "EOT before the message terminator")
            return True
        if byte == ENQ:
            # The sender started over (it lost our answers): the partial message is void.
            del buf[0]
            self._discard(out, "sender restarted with ENQ")
            self._expected, self._accepted_any = 1, False
            out.append(Write(_ACK_B))
            self.deadline = now + self.timers.frame
            return True
        if byte != STX:
            skip = _find_restart(buf, 0, len(buf))
            skip = skip if skip > 0 else len(buf)
            self.noise_bytes += skip
            del buf[:skip]
            return True
        stop, is_end = _frame_stop(buf, 1)
        if (len(buf) if stop < 0 else stop) - 2 > self.max_frame_size:
            if stop < 0:
                del buf[:]
                self._discarding_frame = True
                return False
            self._oversize(buf, stop, is_end, now, out)
            return True
        if stop < 0:
            return False
        if not is_end:
            del buf[:stop]
            out.append(Notice("malformed", "frame cut short"))
            out.append(Write(_NAK_B))
            self.deadline = now + self.timers.frame
            return True
        tail = _find_restart(buf, stop + 1, min(len(buf), stop + 5))
        if tail >= 0:
            del buf[:tail]
            out.append(Notice("malformed", "frame trailer cut short"))
            out.append(Write(_NAK_B))
            self.deadline = now + self.timers.frame
            return True
        if len(buf) < stop + 5:
            return False  # checksum, CR, LF still to come
        frame = bytes(buf[: stop + 5])
        del buf[: stop + 5]
        self.deadline = now + self.timers.frame
        self._handle_frame(frame, stop, now, out)
        return True

    def _oversize(self, buf: bytearray, stop: int, is_end: bool, now: float, out: list[Event]) -> None:
        """End of an oversize frame found at ``stop``: drop it (and its trailer), NAK."""
        if is_end:
            del buf[: stop + 1]
            self._skip_tail = 4
        else:
            del buf[:stop]
        self._discarding_frame = False
        out.append(Notice("oversize", f"frame text over {self.max_frame_size} bytes"))
        out.append(Write(_NAK_B))
        self.deadline = now + self.timers.frame

    def _handle_frame(self, frame: bytes, end: int, now: float, out: list[Event]) -> None:
        number = frame[1]
        body = frame[1 : end + 1]
        sent_sum = frame[end + 1 : end + 3].upper()
        if number not in _FRAME_DIGITS or frame[end + 3 : end + 5] != b"\r\n":
            out.append(Notice("malformed", "bad frame number or frame trailer"))
            out.append(Write(_NAK_B))
            return
        if sent_sum != checksum(body):
            out.append(Notice("checksum", "checksum mismatch"))
            out.append(Write(_NAK_B))
            return
        digit = number - 0x30
        if digit != self._expected:
            if self._accepted_any and digit == (self._expected - 1) % 8:
                out.append(Notice("repeated", "repeated frame acknowledged, not appended"))
                out.append(Write(_ACK_B))
            else:
                out.append(Notice("bad-frame-number", f"expected {self._expected}, got {digit}"))
                out.append(Write(_NAK_B))
            return
        text = frame[2:end]
        if len(self._text) + len(text) > self.max_message_size:
            out.append(Notice("oversize", f"message over {self.max_message_size} bytes"))
            out.append(Write(_NAK_B))
            return
        if frame[end] == ETX and _ends_with_terminator(self._text, text):
            self._pending_final = text
            self._token += 1
            self.state = LinkState.COMMITTING
            self.deadline = now + self.timers.reply
            whole = bytes(self._text) + text
            out.append(MessageReceived(self._token, _lines(whole), len(split_records(whole))))
            return
        self._text += text
        self._advance_frame_number()
        out.append(Write(_ACK_B))

    # ------------------------------------------------------------------ receiver helpers

    def _begin_receive(self, now: float, out: list[Event]) -> None:
        self.state = LinkState.RECEIVING
        self._expected, self._accepted_any = 1, False
        self._text.clear()
        out.append(Write(_ACK_B))
        self.deadline = now + self.timers.frame

    def _advance_frame_number(self) -> None:
        self._expected = (self._expected + 1) % 8
        self._accepted_any = True

    def _record_count(self) -> int:
        return len(split_records(bytes(self._text) + self._pending_final))

    def _discard(self, out: list[Event], reason: str) -> None:
        if self._text:
            records = self._record_count()
            if self.deliver_incomplete:
                self._token += 1
                out.append(MessageReceived(self._token, _lines(bytes(self._text)), records, complete=False))
            else:
                out.append(MessageDiscarded(reason, records))
        self._text.clear()

    def _end_receive(self, now: float, out: list[Event], reason: str) -> None:
        self._discard(out, reason)
        self._discarding_frame = False
        self._to_neutral(now, out)

    # ------------------------------------------------------------------ sender helpers

    def _to_neutral(self, now: float, out: list[Event]) -> None:
        self.state = LinkState.NEUTRAL
        self.deadline = self._retry_at if self._outbox else None
        self._maybe_establish(now, out)

    def _maybe_establish(self, now: float, out: list[Event]) -> None:
        if self.state is not LinkState.NEUTRAL or not self._outbox:
            return
        if self._retry_at is not None and now < self._retry_at:
            self.deadline = self._retry_at
            return
        self._retry_at = None
        self._establish_attempts += 1
        self.state = LinkState.ESTABLISHING
        self.deadline = now + self.timers.establishment
        out.append(Write(_ENQ_B))

    def _establish_failed(self, now: float, out: list[Event], delay: float, reason: str) -> None:
        self.state = LinkState.NEUTRAL
        if self._establish_attempts >= self.max_attempts:
            message_id, _ = self._outbox.popleft()
            self._establish_attempts = 0
            out.append(SendResult(message_id, False, f"{reason}; gave up after {self.max_attempts} attempts"))
        self._retry_at = now + delay
        self.deadline = self._retry_at if self._outbox else None
        if not self._outbox:
            self._retry_at = None

    def _contention(self, now: float, out: list[Event]) -> None:
        out.append(Notice("contention", "both sides sent ENQ"))
        self._establish_attempts -= 1  # contention is not a failed attempt
        self.state = LinkState.NEUTRAL
        if self.instrument:
            self._retry_at = now + self.timers.instrument_contention_retry
        else:
            self._retry_at = now + self.timers.contention_retry
        self.deadline = self._retry_at

    def _write_frame(self, now: float, out: list[Event]) -> None:
        if self._frame_index == 0 and self._attempts == 0:
            self._frames = frames_for_message(self._outbox[0][1])
        self._attempts += 1
        self.state = LinkState.SENDING
        self.deadline = now + self.timers.reply
        out.append(Write(self._frames[self._frame_index]))

    def _abort_send(self, now: float, out: list[Event], reason: str) -> None:
        message_id, _ = self._outbox.popleft()
        out.append(Notice("abort", reason))
        out.append(Write(_EOT_B))
        out.append(SendResult(message_id, False, reason))
        self._frames = []
        self._attempts = 0
        self._establish_attempts = 0
        self._to_neutral(now, out)


_RESTART_SEARCH = re.compile(b"[\x02\x04\x05]").search  # STX EOT ENQ
_TERMINATOR_SEARCH = re.compile(b"[\x03\x17]").search  # ETX ETB


def _find_restart(buf: bytearray, start: int, stop: int) -> int:
    """Index of the first STX/EOT/ENQ in ``buf[start:stop]``, or -1 (one C-level scan)."""
    match = _RESTART_SEARCH(buf, start, stop)
    return match.start() if match is not None else -1


def _frame_stop(buf: bytearray, start: int) -> tuple[int, bool]:
    """First ETX/ETB (True) or STX/EOT/ENQ (False) from ``start``; (-1, False) if none."""
    match = _TERMINATOR_SEARCH(buf, start)
    end = match.start() if match is not None else -1
    cut = _find_restart(buf, start, end if end >= 0 else len(buf))
    if cut >= 0:
        return cut, False
    return end, end >= 0


def _ends_with_terminator(accepted: bytearray, text: bytes) -> bool:
    """Does the record stream ending with ``text`` end with an L record (LIS02-A2 §6.12)?"""
    # the last record starts after the last record separator before it (not at a fixed window,
    # which could start inside a long record)
    start = max(accepted.rfind(b"\r"), accepted.rfind(b"\n")) + 1
    records = split_records(bytes(accepted[start:]) + text)
    return bool(records) and records[-1][:1] in (b"L", b"l")


def _lines(text: bytes) -> bytes:
    return b"".join(record + b"\n" for record in split_records(text))


# --------------------------------------------------------------------------- E1394 records


@dataclass(frozen=True, slots=True)
class AstmDelimiters:
    """LIS02-A2 §5.4: declared in H.2 (field, repeat, component, escape)."""

    field: str = "|"
    repeat: str = "\\"
    component: str = "^"
    escape: str = "&"


@dataclass(frozen=True, slots=True)
class AstmRecord:
    """One E1394 record. ``fields[0]`` is the record type (field 1, e.g. ``H``, ``R``)."""

    type: str
    fields: tuple[str, ...]
    delimiters: AstmDelimiters

    def field(self, number: int) -> str:
        """Field by its LIS02-A2 number (1 = record type); empty when absent."""
        return self.fields[number - 1] if 0 < number <= len(self.fields) else ""

    def components(self, number: int) -> list[str]:
        return self.field(number).split(self.delimiters.component)


def parse_records(text: str | bytes, encoding: str = "utf-8") -> list[AstmRecord]:
    """Split E1394 record text (records separated by CR/LF) into typed records.

    Delimiters come from the H record's field 2 (LIS02-A2 §7.1.2: the characters after ``H``
    are field, repeat, component, escape); without a leading H record the defaults
    ``| \\ ^ &`` apply. A frame number left in front of a record (``1H|...``, as Medplum's
    generic byte stream delivers it) is ignored. Record types: H P O R C Q M S L (§6).
    """
    if isinstance(text, bytes):
        text = text.decode(encoding, errors="replace")
    delimiters = AstmDelimiters()
    records: list[AstmRecord] = []
    for line in re.split(r"\r\n|\r|\n", text):
        if len(line) > 1 and line[0] in "01234567" and line[1].isalpha():
            line = line[1:]
        if not line:
            continue
        if line[0] in "Hh" and len(line) >= 5:
            delimiters = AstmDelimiters(field=line[1], repeat=line[2], component=line[3], escape=line[4])
            # H.2 is the delimiter definition itself, not a field to split further.
            fields = [line[0], line[2:5], *line[6:].split(delimiters.field)] if len(line) > 5 else [line[0], line[2:5]]
        else:
            fields = line.split(delimiters.field)
        records.append(AstmRecord(type=fields[0][:1].upper(), fields=tuple(fields), delimiters=delimiters))
    return records


def header_identity(records: list[AstmRecord]) -> tuple[str, str]:
    """(sender, message control id) from the H record: H.5 first component and H.3."""
    for record in records:
        if record.type == "H":
            return record.components(5)[0], record.field(3)
    return "", ""
