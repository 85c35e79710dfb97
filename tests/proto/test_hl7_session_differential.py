"""The Cython ACK sequencer against its specification, the pure one, event by event, byte by byte.

Hypothesis builds a random MLLP byte stream (valid messages in every MSH-15/16 combination,
reused control ids, undecodable and UTF-16 messages, junk between frames, frames without an MSH,
frames over the decoder's limit with and without a readable MSH), cuts it into random chunks,
and drives both twins through the same random interleaving of receipts, commits (any order, any
outcome, storage errors, duplicates, reused ids), bot replies (HL7 and not, errors, control
bytes, unknown ids), timeout expiries, sends (with and without ``now``, lost), a second session
sharing the counters, and close. After every step the returned events, the bytes the device
would read and the whole visible state (counters, as_dict, latency, outstanding, unfinished,
writable, next_deadline) must be equal. ACK frames carry a fresh MSH-7 timestamp and MSH-10
control id, so those two fields are blanked before the comparison; everything else is compared
byte for byte.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medagent import _compat
from medagent.channels.endpoint import MllpOptions
from medagent.proto import hl7_session as hs
from medagent.proto.ackpolicy import AckMode, AppLevelAck, DuplicateBehavior
from medagent.proto.mllp import FrameTooLarge, MllpDecoderPy
from medagent.records import CommitResult

pytestmark = pytest.mark.skipif(_compat.NO_EXTENSIONS, reason="pure mode (MEDAGENT_NO_EXTENSIONS) in force")

MAX_FRAME = 600
BOUNDS = (1.0, 10.0, 100.0, float("inf"))


def _message(control_id: str, msh15: str, msh16: str, charset: str, pad: int) -> bytes:
    return (f"MSH|^~\\&|LAB|HOSP|MEDAGENT|CLOUD|20240101120000||ORU^R01|{control_id}|P|2.5.1|||"
            f"{msh15}|{msh16}||{charset}\rPID|1||123||DOE^JOHN\rOBX|1|ST|X||{'v' * pad}\r").encode("latin-1")


_CONDITIONS = st.sampled_from(["", "AL", "NE", "ER", "SU"])


@st.composite
def _payload(draw: st.DrawFn) -> bytes:
    """One frame's payload: mostly valid messages, and every kind of bad one."""
    kind = draw(st.sampled_from(["valid"] * 6 + ["charset", "wide", "no-msh", "oversize", "oversize-junk", "bad-utf8"]))
    control_id = f"C{draw(st.integers(0, 5))}"  # few ids: reuses and duplicates are common
    msh15, msh16 = draw(_CONDITIONS), draw(_CONDITIONS)
    if kind == "valid":
        return _message(control_id, msh15, msh16, draw(st.sampled_from(["", "8859/1", "UNICODE UTF-8"])), 3)
    if kind == "charset":
        return _message(control_id, msh15, msh16, "KLINGON-8", 3)
    if kind == "wide":
        return _message(control_id, msh15, msh16, "", 3).decode("latin-1").encode("utf-16")
    if kind == "no-msh":
        return draw(st.sampled_from([b"PID|1||2\r", b"MSH", b"hello"]))
    if kind == "oversize":
        return _message(control_id, msh15, msh16, "", MAX_FRAME)
    if kind == "oversize-junk":
        return b"X" * (MAX_FRAME + 10)
    return _message(control_id, msh15, msh16, "UNICODE UTF-8", 3).replace(b"DOE", b"D\xff\xfeE")


@st.composite
def _stream(draw: st.DrawFn) -> list[bytes]:
    """The device's bytes, cut into random chunks."""
    out = bytearray()
    for payload in draw(st.lists(_payload(), min_size=1, max_size=12)):
        if draw(st.integers(0, 5)) == 0:
            out += draw(st.sampled_from([b"junk", b"\r\n", b"\x1c\r"]))
        out += b"\x0b" + payload + b"\x1c" + draw(st.sampled_from([b"\r", b"\r", b""]))
    cuts = sorted(draw(st.lists(st.integers(0, len(out)), max_size=8)))
    return [bytes(out[a:b]) for a, b in zip([0, *cuts], [*cuts, len(out)], strict=True)]


_RESULTS = st.sampled_from([
    CommitResult(1), CommitResult(2, control_id_reused=True), CommitResult(None, None, "storage error: disk full"),
    CommitResult(None, 3), CommitResult(4, 3), CommitResult(None, None, "bad\x0bbyte"),
])
_BODIES = st.sampled_from([
    "MSH|^~\\&|BOT\rMSA|AA|{id}\r", "MSH|^~\\&|BOT\rMSA|AE|{id}\r", "MSH|^~\\&|BOT\rMSA|AR|{id}\r",
    "MSH|^~\\&|BOT\rMSA|CA|{id}\r", "bot failed", "", "MSH|^~\\&|BOT\rMSA|AA|{id}\x1c\r", "caf\u00e9 {id}",
])


def _blank_ack_ids(data: bytes) -> list[tuple[str, str]]:
    """(codec, text) of the frames in `data`, MSH-7 and MSH-10 of our own ACKs blanked (fresh per ACK)."""
    frames = []
    for frame in MllpDecoderPy().feed(data):
        codec = "utf-16" if frame[:2] in (b"\xff\xfe", b"\xfe\xff") else "latin-1"
        head, sep, rest = frame.decode(codec).partition("\r")
        fields = head.split("|")
        if head.startswith("MSH|") and "\rMSA|" in sep + rest and len(fields) > 9 and fields[2] == "MEDAGENT":
            fields[6] = fields[9] = ""
        frames.append((codec, "|".join(fields) + sep + rest))
    return frames


def _event(result: Any) -> Any:
    """A comparable view of what receive_frame returned."""
    if isinstance(result, (hs.Rejected, hs.FramingError)):
        return result
    return ("slot", _slot(result), result.record)


def _slot(slot: Any) -> tuple[Any, ...]:
    return (slot.message, slot.control_id, slot.accept_ack_type, slot.app_ack_type, slot.charset, slot.state,
            slot.ack_code, slot.ack is None, slot.deadline, slot.received)


def _state(session: Any, bytes_sent: int) -> tuple[Any, ...]:
    """The session's visible state; ``bytes_sent`` checked against what the test saw written
    (ACK lengths differ between the twins by their fresh MSH-10s, so it is not compared)."""
    c = session.counters
    counts = c.as_dict()
    assert counts.pop("bytes_sent") == bytes_sent
    return (counts, dict(c.answers), list(c.latency), session.outstanding, session.unfinished,
            session.writable, session.next_deadline(), session.framing_errors_in_row, session.closed,
            session.sequence.next)


class _Side:
    """One twin: its session(s), the slots it returned, what the device has read."""

    def __init__(self, session_cls: Any, counters_cls: Any, sequence_cls: Any, options: MllpOptions) -> None:
        self.counters = counters_cls(BOUNDS)
        self.sequence = sequence_cls(7)
        self.session = session_cls(options, channel="ch", remote="10.0.0.9:1", counters=self.counters,
                                   sequence=self.sequence)
        self.other = session_cls(options, channel="ch", remote="10.0.0.9:2", counters=self.counters,
                                 sequence=self.sequence)
        self.slots: list[Any] = []
        self.bytes_sent = 0
        self.decoder = MllpDecoderPy(MAX_FRAME)

    def feed(self, chunk: bytes, now: float) -> list[Any]:
        events = []
        while True:
            try:
                frames = self.decoder.feed(chunk)
            except FrameTooLarge as exc:
                events += [self._receive(frame, now) for frame in exc.frames]
                events.append(self._receive(exc, now))
                chunk = b""  # the decoder keeps the remainder; feed b"" to resume
                continue
            events += [self._receive(frame, now) for frame in frames]
            return events

    def _receive(self, frame: Any, now: float) -> Any:
        result = self.session.receive_frame(frame, now, 1700000000.5)
        if type(result) is not hs.Rejected and type(result) is not hs.FramingError:
            self.slots.append(result)
        return _event(result)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), mode=st.sampled_from(list(AckMode)), duplicates=st.sampled_from(list(DuplicateBehavior)),
       app_level=st.sampled_from(list(AppLevelAck)), seq=st.booleans(), stream=_stream())
def test_cython_session_matches_the_pure_one(data: st.DataObject, mode: AckMode, duplicates: DuplicateBehavior,
                                            app_level: AppLevelAck, seq: bool, stream: list[bytes]) -> None:
    options = MllpOptions(ack_mode=mode, response_timeout_s=0.5, duplicate_behavior=duplicates,
                          app_level_ack=app_level, assign_seq_no=seq, encoding="latin-1" if seq else "utf-8")
    py = _Side(hs.Hl7SessionPy, hs.Hl7CountersPy, hs.SequenceCounterPy, options)
    c = _Side(hs.Hl7SessionC, hs.Hl7CountersC, hs.SequenceCounterC, options)
    now = 0.0
    chunks = list(stream)
    for _ in range(data.draw(st.integers(1, 50), label="steps")):
        actions = ["feed"] * 3 if chunks else []
        actions += ["commit"] * 3 if py.slots else []
        actions += ["reply", "reply", "expire", "send", "send", "tick", "other", "close"]
        action = data.draw(st.sampled_from(actions), label="action")
        if action == "feed":
            chunk = chunks.pop(0)
            assert py.feed(chunk, now) == c.feed(chunk, now)
        elif action == "commit":
            index = data.draw(st.integers(0, len(py.slots) - 1), label="slot")
            result = data.draw(_RESULTS, label="result")
            via_slot = data.draw(st.booleans(), label="via slot")
            for side in (py, c):
                slot = side.slots.pop(index)
                slot.committed(result) if via_slot else side.session.committed(slot, result)
        elif action == "reply":
            control_id = f"C{data.draw(st.integers(0, 6), label='reply id')}"
            body = data.draw(_BODIES, label="body").format(id=control_id)
            status = data.draw(st.sampled_from([200, 200, 400, 500]), label="status")
            assert py.session.reply(control_id, body, status, now) == c.session.reply(control_id, body, status, now)
        elif action == "expire":
            assert py.session.expire(now) == c.session.expire(now)
        elif action == "send":
            lost = data.draw(st.booleans(), label="lost") and data.draw(st.booleans())
            at = data.draw(st.sampled_from([None, now]), label="now")
            sent_py, sent_c = py.session.data_to_send(at, lost=lost), c.session.data_to_send(at, lost=lost)
            py.bytes_sent += len(sent_py)
            c.bytes_sent += len(sent_c)
            assert _blank_ack_ids(sent_py) == _blank_ack_ids(sent_c)
        elif action == "tick":
            now += data.draw(st.sampled_from([0.001, 0.02, 0.3, 0.6]), label="tick")
        elif action == "other":  # a second connection of the channel: shared counters and MSH-13 sequence
            frame = _message("O1", "", "", "", 1)
            assert _event(py.other.receive_frame(frame, now, 1.0)) == _event(c.other.receive_frame(frame, now, 1.0))
        elif action == "close":
            py.session.close()
            c.session.close()
        assert _state(py.session, py.bytes_sent) == _state(c.session, c.bytes_sent)
        assert [_slot(s) for s in py.slots] == [_slot(s) for s in c.slots]


def test_the_public_names_are_the_active_twin() -> None:
    """Importers get one consistent set of classes: the Cython ones when extensions are active."""
    assert (hs.Hl7Session, hs.Slot, hs.Hl7Counters, hs.SequenceCounter) == (
        hs.Hl7SessionC, hs.SlotC, hs.Hl7CountersC, hs.SequenceCounterC)
    session = hs.Hl7Session(MllpOptions(ack_mode=AckMode.FAST))
    slot = session.receive_frame(_message("P1", "", "", "", 1), 0.0, 1.0)
    assert type(slot) is hs.Slot and isinstance(session.counters, hs.Hl7Counters)
    assert isinstance(session.sequence, hs.SequenceCounter)
    with pytest.raises(TypeError):  # a session and its counters come from one twin
        hs.Hl7SessionC(MllpOptions(), counters=hs.Hl7CountersPy())


def test_fifo_compaction_keeps_order_over_many_messages() -> None:
    """The Cython FIFO (a list with a head index, compacted now and then) over thousands of slots,
    with a held-back commit every 50 messages so the completed prefix waits behind it."""
    options = MllpOptions(ack_mode=AckMode.FAST)
    sent: list[list[tuple[str, str]]] = []
    for session in (hs.Hl7SessionPy(options), hs.Hl7SessionC(options)):
        out: list[tuple[str, str]] = []
        held: Any = None
        for n in range(3000):
            slot: Any = session.receive_frame(_message(f"F{n}", "", "", "", 1), 0.0, 1.0)
            if n % 50 == 0:
                held = slot
            else:
                slot.committed(CommitResult(n))
            if n % 50 == 49:
                held.committed(CommitResult(n))
            out += _blank_ack_ids(session.data_to_send(0.0))
            out.append(("outstanding", str(session.outstanding)))
        sent.append(out)
    assert sent[0] == sent[1]
    assert len([f for f in sent[0] if f[1].startswith("MSH")]) == 3000
