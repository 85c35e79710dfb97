"""The HL7 ACK sequencer (medagent.proto.hl7_session), both twins, without sockets or a loop.

Example tests pin each transition; the differential test (hypothesis) drives the session and a
deliberately naive reference model (a list, decided flags, flush the decided prefix) through the
same random interleaving of receipts, commits (any order, any outcome), bot replies and timeout
expiries, in every ACK mode, and compares what the device would read after every step. Every
test runs against both twins (``impl``): the pure session with the pure header/ACK kernels, and
the Cython session (which always calls the Cython kernels). The two twins are compared with
each other, event by event and byte by byte, in test_hl7_session_differential.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testsupport import pick

from medagent.channels.endpoint import MllpOptions
from medagent.proto import ackpolicy, hl7_session
from medagent.proto import hl7 as hl7proto
from medagent.proto.ackpolicy import AckMode, CommitOutcome, DuplicateBehavior
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
from medagent.proto.mllp import FrameTooLarge, MllpDecoderPy
from medagent.records import CommitResult

TIMEOUT_S = 1.0


def message(control_id: str, msh15: str = "", msh16: str = "", charset: str = "") -> bytes:
    return (f"MSH|^~\\&|LAB|HOSP|MEDAGENT|CLOUD|20240101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1|||"
            f"{msh15}|{msh16}||{charset}\rPID|1||123||DOE^JOHN\r").encode("latin-1")


def acks(data: bytes) -> list[tuple[str, str]]:
    """(MSA-1, MSA-2) of every MLLP frame in `data` (what the device reads)."""
    out = []
    for frame in MllpDecoderPy().feed(data):
        info = hl7proto.parse_ack(frame)
        assert info is not None, "an ACK without MSA"
        out.append((info.code, info.control_id))
    return out


def session(mode: AckMode, **options: object) -> Hl7Session:
    return Hl7Session(MllpOptions(ack_mode=mode, response_timeout_s=TIMEOUT_S, **options),  # type: ignore[arg-type]
                      channel="adt-in", remote="10.0.0.5:4000")


def accepted(result: object) -> Slot:
    assert type(result) is Slot, result
    return result


STORED = CommitResult(1)


@pytest.fixture(autouse=True)
def twin(impl: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run every test with the pure session (and kernels) and with the Cython session.

    The test functions use this module's names Hl7Session, Slot, Hl7Counters, SequenceCounter;
    they are rebound to the twin under test.
    """
    for name in ("parse_header", "build_ack", "decode"):
        monkeypatch.setattr(hl7proto, name, pick(hl7proto, name, impl))
    for name in ("Hl7Session", "Slot", "Hl7Counters", "SequenceCounter"):
        monkeypatch.setattr(sys.modules[__name__], name, pick(hl7_session, name, impl))
    yield


# ------------------------------------------------------------------ examples


def test_fast_mode_acks_in_arrival_order_whatever_the_commit_order() -> None:
    s = session(AckMode.FAST)
    slots = [accepted(s.receive_frame(message(f"F{i}"), 0.0, 1.0)) for i in range(3)]
    assert all(slot.record is not None and slot.record.control_id == f"F{i}" for i, slot in enumerate(slots))
    assert slots[0].record is not None and slots[0].record.sender == "LAB^HOSP"
    assert s.durable and s.data_to_send() == b"" and s.unfinished == 3
    slots[2].committed(STORED)
    slots[1].committed(STORED)
    assert not s.writable and s.data_to_send() == b""  # F0 still open: nothing overtakes it
    slots[0].committed(STORED)
    assert s.writable and acks(s.data_to_send(0.001)) == [("AA", "F0"), ("AA", "F1"), ("AA", "F2")]
    assert s.outstanding == 0 and s.counters.acks_positive == 3 and s.counters.answers == {"AA": 3}
    assert sum(s.counters.latency) == 3


def test_immediate_mode_is_ready_on_receipt_and_not_durable() -> None:
    s = session(AckMode.IMMEDIATE)
    slot = accepted(s.receive_frame(message("I1"), 0.0, 1.0))
    assert not s.durable and s.writable
    assert acks(s.data_to_send()) == [("AA", "I1")]
    slot.committed(STORED)  # nothing to do: no commit callback is registered in this mode
    assert s.data_to_send() == b""


def test_defect2_fast_and_immediate_aa_follow_msh15() -> None:
    for mode in (AckMode.FAST, AckMode.IMMEDIATE):
        s = session(mode)
        slot = accepted(s.receive_frame(message("D2", msh15="AL", msh16="NE"), 0.0, 1.0))
        if mode is AckMode.FAST:
            slot.committed(STORED)
        assert acks(s.data_to_send()) == [("AA", "D2")]


def test_two_phase_ca_then_app_ack_filtered_by_msh16() -> None:
    s = session(AckMode.TWO_PHASE)
    first = accepted(s.receive_frame(message("T1"), 0.0, 1.0))
    second = accepted(s.receive_frame(message("T2", msh16="ER"), 0.0, 1.0))
    first.committed(STORED)
    second.committed(STORED)
    assert acks(s.data_to_send()) == [("CA", "T1"), ("CA", "T2")]
    assert s.reply("T2", "MSH|^~\\&|B\rMSA|AA|T2\r") is ReplyResult.SUPPRESSED  # MSH-16=ER, success
    assert s.reply("T1", "MSH|^~\\&|B\rMSA|AE|T1|no\r") is ReplyResult.WRITTEN
    assert s.reply("T1", "MSH|^~\\&|B\rMSA|AE|T1|no\r") is ReplyResult.LATE  # a second reply
    assert s.data_to_send() == b"\x0bMSH|^~\\&|B\rMSA|AE|T1|no\r\x1c\r"


def test_original_reply_is_the_ack_and_timeout_answers_ar() -> None:
    s = session(AckMode.ORIGINAL)
    slots = [accepted(s.receive_frame(message(f"O{i}"), float(i), 1.0)) for i in range(3)]
    for slot in slots:
        slot.committed(STORED)
    assert s.next_deadline() == TIMEOUT_S
    assert s.reply("O1", "bot crashed", 500) is ReplyResult.WRITTEN  # an AE built from O1
    assert s.data_to_send() == b""  # O0 still waits
    assert s.expire(0.5) == [] and s.expire(1.0) == ["O0"]
    assert acks(s.data_to_send()) == [("AR", "O0"), ("AE", "O1")]
    assert s.next_deadline() == 2.0 + TIMEOUT_S
    assert s.expire(3.0) == ["O2"]
    assert s.reply("O2", "MSH|^~\\&|B\rMSA|AA|O2\r") is ReplyResult.LATE
    assert acks(s.data_to_send()) == [("AR", "O2")] and s.next_deadline() is None
    assert s.counters.replies_timed_out == 2 and s.counters.replies_late == 1


def test_original_reused_control_id_replies_go_fifo() -> None:
    s = session(AckMode.ORIGINAL)
    a = accepted(s.receive_frame(message("R"), 0.0, 1.0))
    b = accepted(s.receive_frame(message("R"), 0.0, 1.0))
    a.committed(STORED)
    b.committed(CommitResult(2, control_id_reused=True))
    assert s.counters.control_id_reused == 1
    assert s.reply("R", "MSH|^~\\&|B\rMSA|AE|R|first\r") is ReplyResult.WRITTEN
    assert s.reply("R", "MSH|^~\\&|B\rMSA|AA|R|second\r") is ReplyResult.WRITTEN
    frames = MllpDecoderPy().feed(s.data_to_send())
    assert [hl7proto.parse_ack(f).text for f in frames] == ["first", "second"]  # type: ignore[union-attr]


def test_storage_error_and_duplicates() -> None:
    s = session(AckMode.FAST, duplicate_behavior=DuplicateBehavior.REJECT)
    failed = accepted(s.receive_frame(message("X1"), 0.0, 1.0))
    dropped = accepted(s.receive_frame(message("X2"), 0.0, 1.0))
    flagged = accepted(s.receive_frame(message("X3"), 0.0, 1.0))
    failed.committed(CommitResult(None, None, "storage error: disk full"))
    dropped.committed(CommitResult(None, 7))
    flagged.committed(CommitResult(9, 7))
    assert acks(s.data_to_send()) == [("CE", "X1"), ("AA", "X2"), ("AR", "X3")]
    assert s.counters.acks_positive == 1 and s.counters.acks_negative == 2


def test_rejections_and_framing_errors() -> None:
    s = session(AckMode.TWO_PHASE)
    rejected = s.receive_frame(message("K1", charset="KLINGON-8"), 0.0, 1.0)
    assert type(rejected) is Rejected and rejected.control_id == "K1" and "KLINGON-8" in rejected.reason
    oversize = s.receive_frame(FrameTooLarge(50, [], message("BIG")[:90]), 0.0, 1.0)
    assert type(oversize) is Rejected and "50" in oversize.reason
    headless = s.receive_frame(FrameTooLarge(50, [], b"ZZZZ"), 0.0, 1.0)
    assert type(headless) is FramingError and not headless.close
    assert acks(s.data_to_send()) == [("CR", "K1"), ("CR", "BIG")]
    for count in range(2, MAX_CONSECUTIVE_FRAMING_ERRORS + 1):
        error = s.receive_frame(b"not hl7", 0.0, 1.0)
        assert type(error) is FramingError and error.close is (count == MAX_CONSECUTIVE_FRAMING_ERRORS)
    accepted(s.receive_frame(message("OK"), 0.0, 1.0))
    assert s.framing_errors_in_row == 0
    assert s.counters.messages_rejected == 2 and s.counters.framing_errors == MAX_CONSECUTIVE_FRAMING_ERRORS


def test_assign_seq_no_shares_the_channel_counter() -> None:
    counters, sequence = Hl7Counters(), SequenceCounter(41)
    options = MllpOptions(ack_mode=AckMode.FAST, assign_seq_no=True)
    one = Hl7Session(options, counters=counters, sequence=sequence)
    two = Hl7Session(options, counters=counters, sequence=sequence)
    bodies = []
    for s in (one, two, one):
        record = accepted(s.receive_frame(message("Q"), 0.0, 1.0)).record
        assert record is not None
        bodies.append(record.body)
    assert [body.split(b"\r")[0].split(b"|")[12] for body in bodies] == [b"41", b"42", b"43"]
    wide = accepted(one.receive_frame(message("W").decode("latin-1").encode("utf-16"), 0.0, 1.0)).record
    assert wide is not None and wide.body == message("W").decode("latin-1").encode("utf-16")
    assert counters.seq_no_skipped == 1 and counters.messages_received == 4 and sequence.next == 44


def test_completions_after_close_are_counted_lost() -> None:
    s = session(AckMode.FAST)
    slot = accepted(s.receive_frame(message("L1"), 0.0, 1.0))
    s.close()
    slot.committed(STORED)
    assert s.counters.acks_lost == 1
    s2 = session(AckMode.FAST)
    accepted(s2.receive_frame(message("L2"), 0.0, 1.0)).committed(STORED)
    assert s2.data_to_send(lost=True) == b"" and s2.counters.acks_lost == 1 and s2.outstanding == 0


def test_commit_listener_is_called_instead_of_the_session() -> None:
    calls: list[tuple[Slot, CommitResult]] = []

    class Listener:
        def slot_committed(self, slot: Slot, result: CommitResult) -> None:
            calls.append((slot, result))

    s = Hl7Session(MllpOptions(ack_mode=AckMode.FAST), listener=Listener())
    slot = accepted(s.receive_frame(message("C1"), 0.0, 1.0))
    slot.committed(STORED)
    assert calls == [(slot, STORED)] and s.unfinished == 1


# ------------------------------------------------------------------ differential (hypothesis)


@dataclass
class _Entry:
    """The reference model's view of one FIFO entry."""

    control_id: str
    msh15: str
    msh16: str
    decided: bool = False
    code: str | None = None  # MSA-1 written for it (None: nothing)
    state: str = "await-commit"  # await-commit | await-reply | done
    deadline: float = 0.0


@dataclass
class _Model:
    mode: AckMode
    fifo: list[_Entry] = field(default_factory=list)
    contexts: dict[str, list[str]] = field(default_factory=dict)  # two-phase: control id -> msh16s
    written: list[tuple[str, str]] = field(default_factory=list)

    def flush(self) -> None:
        while self.fifo and self.fifo[0].decided:
            entry = self.fifo.pop(0)
            if entry.code is not None:
                self.written.append((entry.code, entry.control_id))

    def decide(self, entry: _Entry, decision: ackpolicy.AckDecision | None) -> None:
        entry.decided, entry.state = True, "done"
        entry.code = None if decision is None else decision.code.value


_CONDITIONS = st.sampled_from(["", "AL", "NE", "ER", "SU"])
_OUTCOMES = st.sampled_from([CommitResult(1), CommitResult(None, None, "storage error: x"), CommitResult(None, 3),
                             CommitResult(4, 3)])
_REPLIES = st.sampled_from([("AA", 200), ("AE", 200), ("AR", 200), ("", 500)])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), mode=st.sampled_from(list(AckMode)),
       duplicates=st.sampled_from(list(DuplicateBehavior)))
def test_session_matches_the_reference_model(data: st.DataObject, mode: AckMode,
                                             duplicates: DuplicateBehavior) -> None:
    options = MllpOptions(ack_mode=mode, response_timeout_s=TIMEOUT_S, duplicate_behavior=duplicates)
    s = Hl7Session(options)
    model = _Model(mode)
    slots: dict[int, Slot] = {}
    entries: dict[int, _Entry] = {}
    now = 0.0
    received = 0
    device: list[tuple[str, str]] = []
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        waiting_commit = [i for i, e in entries.items() if e.state == "await-commit" and i in slots]
        replyable = [i for i, e in entries.items() if e.state == "await-reply"]
        choices = ["receive", "junk", "expire"] + (["commit"] * 3 if waiting_commit else [])
        choices += ["reply"] * 2 if replyable or model.contexts else []
        action = data.draw(st.sampled_from(choices), label="action")
        if action == "receive":
            control_id = f"M{received}"
            received += 1
            msh15, msh16 = data.draw(_CONDITIONS, label="msh15"), data.draw(_CONDITIONS, label="msh16")
            bad = data.draw(st.booleans(), label="bad charset") and data.draw(st.booleans())
            result = s.receive_frame(message(control_id, msh15, msh16, "KLINGON-8" if bad else ""), now, 1.0)
            entry = _Entry(control_id, msh15, msh16)
            model.fifo.append(entry)
            if bad:
                assert type(result) is Rejected
                model.decide(entry, ackpolicy.reject_ack(mode, result.reason, msh15, msh16))
            else:
                slots[received - 1] = accepted(result)
                entries[received - 1] = entry
                if mode is AckMode.IMMEDIATE:
                    model.decide(entry, ackpolicy.receipt_ack(mode, msh15, msh16))
                elif mode is AckMode.ORIGINAL:
                    entry.deadline = now + TIMEOUT_S
        elif action == "junk":
            assert type(s.receive_frame(b"junk", now, 1.0)) is FramingError
        elif action == "commit":
            index = data.draw(st.sampled_from(waiting_commit), label="which commit")
            result = data.draw(_OUTCOMES, label="outcome")
            entry = entries[index]
            slots.pop(index).committed(result)
            outcome = ackpolicy.classify_commit(result, duplicates)
            if mode is AckMode.ORIGINAL and outcome is CommitOutcome.STORED:
                entry.state = "await-reply"
            else:
                if mode is AckMode.TWO_PHASE and outcome is CommitOutcome.STORED:
                    model.contexts.setdefault(entry.control_id, []).append(entry.msh16)
                model.decide(entry, ackpolicy.commit_ack(mode, outcome, result.error, entry.msh15, entry.msh16))
        elif action == "reply":
            targets = [entries[i].control_id for i in replyable] + list(model.contexts)
            control_id = data.draw(st.sampled_from(targets), label="reply to")
            code, status = data.draw(_REPLIES, label="reply")
            body = f"MSH|^~\\&|BOT\rMSA|{code}|{control_id}\r" if code else "bot failed"
            outcome_of_reply = s.reply(control_id, body, status, now)
            is_hl7, reply_code = ackpolicy.classify_reply(body)
            if mode is AckMode.ORIGINAL:
                entry = next(e for e in model.fifo if e.control_id == control_id)
                decision = ackpolicy.reply_decision(mode, options.app_level_ack, status, is_hl7, reply_code,
                                                    entry.msh16, None if is_hl7 else body)
                entry.decided, entry.state = True, "done"
                entry.code = (reply_code.value if decision.action is ackpolicy.ReplyAction.FORWARD
                              and reply_code is not None else "AE" if decision.writes else None)
                assert (outcome_of_reply is ReplyResult.WRITTEN) is decision.writes
            elif mode is AckMode.TWO_PHASE:
                msh16 = model.contexts[control_id].pop(0)
                if not model.contexts[control_id]:
                    del model.contexts[control_id]
                decision = ackpolicy.reply_decision(mode, options.app_level_ack, status, is_hl7, reply_code,
                                                    msh16, None if is_hl7 else body)
                if decision.writes:
                    extra = _Entry(control_id, "", "", decided=True, state="done")
                    extra.code = reply_code.value if reply_code is not None and is_hl7 else "AE"
                    model.fifo.append(extra)
                assert (outcome_of_reply is ReplyResult.WRITTEN) is decision.writes
            else:
                assert outcome_of_reply is ReplyResult.SUPPRESSED
        else:  # expire at a later time
            now += data.draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]), label="advance")
            expired = s.expire(now)
            expected = []
            for entry in model.fifo:
                if mode is AckMode.ORIGINAL and not entry.decided and entry.deadline and entry.deadline <= now:
                    expected.append(entry.control_id)
                    model.decide(entry, ackpolicy.timeout_ack(TIMEOUT_S, entry.msh15, entry.msh16))
            assert expired == expected
        model.flush()
        device += acks(s.data_to_send(now))
        assert device == model.written  # same ACKs, same order, nothing early, nothing held back
        assert sum(1 for e in model.fifo if not e.decided) == s.unfinished
        nxt = s.next_deadline()
        open_deadlines = [e.deadline for e in model.fifo if not e.decided and e.deadline]
        assert nxt == (open_deadlines[0] if open_deadlines else None)

