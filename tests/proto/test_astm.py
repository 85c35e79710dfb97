"""ASTM E1381 link layer (LIS01-A2) and E1394 records (LIS02-A2): the pure core.

There is no Cython twin (ASTM links run at instrument speed; the benchmark shows the pure core
is far from the bottleneck), so these tests have no ``impl`` parameter.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medagent.proto import astm
from medagent.proto.astm import (
    ACK,
    ENQ,
    EOT,
    NAK,
    AstmLink,
    AstmTimers,
    LinkState,
    MessageDiscarded,
    MessageReceived,
    Notice,
    SendResult,
    Write,
    build_frame,
    checksum,
    frames_for_message,
    parse_records,
)

RESULT = (
    b"H|\\^&|||Analyzer^1.0|||||||P|1\r"
    b"P|1||PID001||Doe^John\r"
    b"O|1|S0001||^^^GLU|R\r"
    b"R|1|^^^GLU|5.4|mmol/L||N||F\r"
    b"L|1|N\r"
)
RESULT_LINES = RESULT.replace(b"\r", b"\n")
B_ENQ, B_ACK, B_NAK, B_EOT = bytes([ENQ]), bytes([ACK]), bytes([NAK]), bytes([EOT])


def writes(events: list[Any]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Write))


def of(events: list[Any], cls: type) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


def kinds(events: list[Any]) -> list[str]:
    return [e.kind for e in events if isinstance(e, Notice)]


def session(message: bytes = RESULT) -> bytes:
    """An instrument's whole transmission: ENQ, frames, EOT (answers not modelled)."""
    return B_ENQ + b"".join(frames_for_message(message)) + B_EOT


def receive_all(link: AstmLink, data: bytes, chunks: list[int] | None = None, ok: bool = True) -> list[Any]:
    """Feed `data` (cut at `chunks`), committing every complete message at once."""
    events: list[Any] = []
    pieces = [data] if not chunks else _cut(data, chunks)
    for piece in pieces:
        new = link.feed(piece, 0.0)
        events += new
        for received in of(new, MessageReceived):
            if received.complete:
                events += link.commit_done(received.token, ok, 0.0)
    return events


def _cut(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos = [], 0
    for size in sizes:
        out.append(data[pos : pos + size])
        pos += size
    out.append(data[pos:])
    return out


# --------------------------------------------------------------------------- frames


def test_checksum_and_frame_layout() -> None:
    # LIS01-A2 §6.3.1.4: sum of FN..ETX modulo 256 as two upper-case hex digits.
    frame = build_frame(1, b"L|1|N\r", final=True)
    body = b"1L|1|N\r\x03"
    assert frame == b"\x02" + body + b"%02X" % (sum(body) % 256) + b"\r\n"
    assert checksum(b"\xff\x02") == b"01"
    assert build_frame(8, b"x", final=False)[1:2] == b"0"


def test_frames_one_record_per_etx_frame_and_long_records_in_etb_frames() -> None:
    long_record = b"R|1|" + b"x" * 600
    frames = frames_for_message(b"H|\\^&\n" + long_record + b"\nL|1|N\n")
    assert len(frames) == 1 + 3 + 1
    assert [f[1:2] for f in frames] == [b"1", b"2", b"3", b"4", b"5"]
    terminators = [f[-5] for f in frames]
    assert terminators == [astm.ETX, astm.ETB, astm.ETB, astm.ETX, astm.ETX]
    assert all(len(f) <= 247 for f in frames)
    assert len(frames_for_message(b"H|\\^&\r" * 9)) == 9
    assert frames_for_message(b"H|\\^&\r" * 9)[7][1:2] == b"0"  # 1..7, 0, 1


# --------------------------------------------------------------------------- receiver


def test_normal_session_delivers_records_and_acks_final_frame_after_commit() -> None:
    link = AstmLink()
    events = link.feed(session(), 0.0)
    received = of(events, MessageReceived)
    assert len(received) == 1 and received[0].body == RESULT_LINES and received[0].records == 5
    # ENQ + 4 frames ACKed; the final frame waits for the commit, EOT is held behind it.
    assert writes(events) == B_ACK * 5
    assert link.state is LinkState.COMMITTING
    after = link.commit_done(received[0].token, True, 1.0)
    assert writes(after) == B_ACK
    assert link.state is LinkState.NEUTRAL  # the held EOT was processed after the answer


def test_storage_error_naks_final_frame_and_resend_yields_message_again() -> None:
    link = AstmLink()
    frames = frames_for_message(RESULT)
    events = link.feed(B_ENQ + b"".join(frames), 0.0)
    first = of(events, MessageReceived)[0]
    assert writes(link.commit_done(first.token, False, 0.0)) == B_NAK
    again = link.feed(frames[-1], 0.0)  # the instrument retransmits the final frame
    second = of(again, MessageReceived)[0]
    assert second.body == first.body and second.token != first.token
    assert writes(link.commit_done(second.token, True, 0.0)) == B_ACK
    assert link.commit_done(first.token, True, 0.0) == []  # stale answers are ignored


def test_checksum_error_is_naked_then_resend_accepted() -> None:
    link = AstmLink()
    good = frames_for_message(RESULT)
    bad = bytearray(good[0])
    bad[5] ^= 0x01  # flip a bit in the text: the checksum no longer matches
    events = link.feed(B_ENQ + bytes(bad), 0.0)
    assert writes(events) == B_ACK + B_NAK and kinds(events) == ["checksum"]
    events = receive_all(link, b"".join(good) + B_EOT)
    assert of(events, MessageReceived)[0].body == RESULT_LINES


def test_lower_case_checksum_is_accepted() -> None:
    frame = build_frame(1, b"H|\\^&\r", final=True)
    lower = frame[:-4] + frame[-4:-2].lower() + b"\r\n"
    link = AstmLink()
    assert writes(link.feed(B_ENQ + lower, 0.0)) == B_ACK * 2


def test_repeated_frame_is_acked_not_appended() -> None:
    link = AstmLink()
    frames = frames_for_message(RESULT)
    data = B_ENQ + frames[0] + frames[1] + frames[1] + b"".join(frames[2:]) + B_EOT
    events = receive_all(link, data)
    assert "repeated" in kinds(events)
    assert of(events, MessageReceived)[0].body == RESULT_LINES  # P record once


def test_wrong_frame_number_is_naked() -> None:
    link = AstmLink()
    frames = frames_for_message(RESULT)
    events = link.feed(B_ENQ + frames[0] + frames[2], 0.0)
    assert writes(events) == B_ACK + B_ACK + B_NAK and kinds(events) == ["bad-frame-number"]


def test_first_frame_must_be_number_one() -> None:
    link = AstmLink()
    assert writes(link.feed(B_ENQ + build_frame(0, b"H|\\^&\r", True), 0.0)) == B_ACK + B_NAK


def test_eot_mid_message_discards_incomplete_message() -> None:
    link = AstmLink()
    frames = frames_for_message(RESULT)
    events = link.feed(B_ENQ + b"".join(frames[:3]) + B_EOT, 0.0)
    assert of(events, MessageReceived) == []
    assert of(events, MessageDiscarded) == [MessageDiscarded("EOT before the message terminator", 3)]
    assert link.state is LinkState.NEUTRAL


def test_eot_mid_message_delivers_when_configured() -> None:
    link = AstmLink(deliver_incomplete=True)
    frames = frames_for_message(RESULT)
    events = link.feed(B_ENQ + b"".join(frames[:2]) + B_EOT, 0.0)
    (message,) = of(events, MessageReceived)
    assert not message.complete and message.records == 2


def test_8kb_message_in_etb_frames() -> None:
    comment = b"C|1|I|" + b"ABCDEFGHIJ" * 820 + b"|G"
    message = RESULT.replace(b"L|1|N\r", comment + b"\rL|1|N\r")
    frames = frames_for_message(message)
    assert len(message) > 8192 and sum(f[-5] == astm.ETB for f in frames) >= 30
    events = receive_all(AstmLink(), B_ENQ + b"".join(frames) + B_EOT)
    (received,) = of(events, MessageReceived)
    assert received.body == message.replace(b"\r", b"\n")


def test_two_messages_in_one_session() -> None:
    frames = frames_for_message(RESULT + RESULT)
    events = receive_all(AstmLink(), B_ENQ + b"".join(frames) + B_EOT)
    assert [m.body for m in of(events, MessageReceived)] == [RESULT_LINES, RESULT_LINES]


def test_garbage_and_line_noise_are_ignored() -> None:
    link = AstmLink()
    noise = b"\x00\xff\r\nhello\x06\x15"
    frames = frames_for_message(RESULT)
    data = noise + B_ENQ + noise.replace(b"\x06", b"") + b"".join(f + b"\x00junk" for f in frames) + B_EOT
    events = receive_all(link, data)
    assert of(events, MessageReceived)[0].body == RESULT_LINES
    assert link.noise_bytes > 20
    assert link.state is LinkState.NEUTRAL


def test_frame_cut_short_by_a_new_frame_is_naked() -> None:
    link = AstmLink()
    frames = frames_for_message(RESULT)
    events = link.feed(B_ENQ + frames[0][:8] + frames[0], 0.0)
    assert writes(events) == B_ACK + B_NAK + B_ACK and kinds(events) == ["malformed"]


def test_bad_trailer_is_naked() -> None:
    frame = frames_for_message(RESULT)[0]
    events = AstmLink().feed(B_ENQ + frame[:-2] + b"XY", 0.0)
    assert writes(events) == B_ACK + B_NAK and kinds(events) == ["malformed"]


def test_oversize_frame_is_naked_and_link_recovers() -> None:
    link = AstmLink(max_frame_size=100)
    big = build_frame(1, b"R|" + b"9" * 200 + b"\r", final=True)
    frames = frames_for_message(RESULT)
    events = receive_all(link, B_ENQ + big + b"".join(frames) + B_EOT, chunks=[10, 50, 60])
    assert kinds(events)[0] == "oversize"
    assert writes(events).startswith(B_ACK + B_NAK)
    assert of(events, MessageReceived)[0].body == RESULT_LINES


def test_oversize_message_is_naked() -> None:
    link = AstmLink(max_message_size=50)
    events = receive_all(link, session())
    assert "oversize" in kinds(events) and of(events, MessageReceived) == []


def test_enq_during_receive_restarts_the_session() -> None:
    link = AstmLink()
    frames = frames_for_message(RESULT)
    events = receive_all(link, B_ENQ + frames[0] + B_ENQ + b"".join(frames) + B_EOT)
    assert of(events, MessageDiscarded)[0].reason == "sender restarted with ENQ"
    assert of(events, MessageReceived)[0].body == RESULT_LINES


# --------------------------------------------------------------------------- timers


def test_receiver_frame_timeout_discards_and_returns_to_neutral() -> None:
    link = AstmLink(timers=AstmTimers(frame=30.0))
    link.feed(B_ENQ + frames_for_message(RESULT)[0], 100.0)
    assert link.deadline == 130.0
    assert link.on_timer(129.9) == []
    events = link.on_timer(130.0)
    assert kinds(events) == ["timeout"] and of(events, MessageDiscarded)[0].records == 1
    assert link.state is LinkState.NEUTRAL and link.deadline is None


def test_commit_slower_than_reply_timer_naks_and_ignores_late_outcome() -> None:
    link = AstmLink(timers=AstmTimers(reply=15.0))
    events = link.feed(session(), 0.0)
    token = of(events, MessageReceived)[0].token
    assert link.deadline == 15.0
    timed_out = link.on_timer(15.0)
    assert kinds(timed_out) == ["commit-timeout"] and writes(timed_out) == B_NAK
    assert link.commit_done(token, True, 16.0) == []
    assert link.state is LinkState.NEUTRAL  # the held EOT ended the session


def test_sender_establishment_timeout_sends_eot_and_retries() -> None:
    link = AstmLink(timers=AstmTimers(establishment=15.0, busy_retry=10.0))
    _message_id, events = link.send(RESULT, 0.0)
    assert writes(events) == B_ENQ and link.deadline == 15.0
    events = link.on_timer(15.0)
    assert writes(events) == B_EOT and kinds(events) == ["timeout"] and link.deadline == 25.0
    assert writes(link.on_timer(25.0)) == B_ENQ


def test_sender_gives_up_after_max_establishment_attempts() -> None:
    link = AstmLink(max_attempts=2, timers=AstmTimers(establishment=1.0, busy_retry=1.0))
    message_id, _ = link.send(RESULT, 0.0)
    results: list[Any] = []
    now = 0.0
    for _ in range(10):
        if link.deadline is None:
            break
        now = link.deadline
        results += of(link.on_timer(now), SendResult)
    assert results == [SendResult(message_id, False, "no answer to ENQ; gave up after 2 attempts")]


def test_sender_reply_timeout_aborts_with_eot() -> None:
    link = AstmLink(timers=AstmTimers(reply=15.0))
    message_id, _ = link.send(RESULT, 0.0)
    link.feed(B_ACK, 1.0)
    assert link.state is LinkState.SENDING and link.deadline == 16.0
    events = link.on_timer(16.0)
    assert writes(events) == B_EOT
    assert of(events, SendResult) == [SendResult(message_id, False, "no answer to frame within the reply timer")]


# --------------------------------------------------------------------------- sender


def test_sender_session_frames_and_eot() -> None:
    link = AstmLink()
    message_id, events = link.send(RESULT.replace(b"\r", b"\n"), 0.0)
    assert writes(events) == B_ENQ
    sent = []
    reply = link.feed(B_ACK, 0.0)
    for _ in range(20):
        data = writes(reply)
        sent.append(data)
        if of(reply, SendResult):
            break
        reply = link.feed(B_ACK, 0.0)
    assert sent[:-1] == frames_for_message(RESULT)
    assert sent[-1] == B_EOT and of(reply, SendResult) == [SendResult(message_id, True)]
    assert link.state is LinkState.NEUTRAL


def test_sender_retransmits_on_nak_and_aborts_after_six_attempts() -> None:
    link = AstmLink()
    message_id, _ = link.send(RESULT, 0.0)
    first = writes(link.feed(B_ACK, 0.0))
    retransmits = [writes(link.feed(B_NAK, 0.0)) for _ in range(5)]
    assert retransmits == [first] * 5  # 6 attempts in all
    final = link.feed(B_NAK, 0.0)
    assert writes(final) == B_EOT
    assert of(final, SendResult) == [SendResult(message_id, False, "frame not accepted after 6 attempts")]


def test_sender_treats_other_characters_as_nak_and_eot_as_ack() -> None:
    link = AstmLink()
    link.send(RESULT, 0.0)
    first = writes(link.feed(B_ACK, 0.0))
    assert writes(link.feed(b"?", 0.0)) == first
    assert writes(link.feed(B_EOT, 0.0)) == frames_for_message(RESULT)[1]


def test_busy_receiver_nak_retries_after_ten_seconds() -> None:
    link = AstmLink()
    link.send(RESULT, 0.0)
    events = link.feed(B_NAK, 1.0)
    assert kinds(events) == ["busy"] and link.deadline == 11.0 and link.state is LinkState.NEUTRAL
    assert writes(link.on_timer(11.0)) == B_ENQ


def test_contention_computer_system_yields_to_instrument() -> None:
    host = AstmLink()
    _message_id, _ = host.send(b"H|\\^&\rO|1|S1||^^^GLU\rL|1|N\r", 0.0)
    events = host.feed(B_ENQ, 0.5)  # the instrument's ENQ crossed ours
    assert kinds(events) == ["contention"] and writes(events) == b""
    assert host.state is LinkState.NEUTRAL and host.deadline == 20.5
    # the instrument retries first; the host receives its message, then may send
    events = receive_all(host, session())
    assert of(events, MessageReceived)[0].body == RESULT_LINES
    assert host.state is LinkState.NEUTRAL and host.pending_sends == 1
    assert writes(host.on_timer(20.5)) == B_ENQ


def test_contention_instrument_retries_after_one_second() -> None:
    instrument = AstmLink(instrument=True)
    instrument.send(RESULT, 0.0)
    instrument.feed(B_ENQ, 0.1)
    assert instrument.deadline == pytest.approx(1.1)
    assert writes(instrument.on_timer(1.1)) == B_ENQ


def test_two_links_talk_to_each_other_both_ways() -> None:
    """An instrument-role link and a host-role link, wired back to back."""
    instrument, host = AstmLink(instrument=True), AstmLink()
    order = b"H|\\^&\rO|1|S1||^^^GLU\rL|1|N\r"
    got: dict[str, list[Any]] = {"host": [], "instrument": []}
    _, start_i = instrument.send(RESULT, 0.0)
    _, start_h = host.send(order, 0.0)
    queue: list[tuple[str, Any]] = [("instrument", e) for e in start_i] + [("host", e) for e in start_h]
    links = {"instrument": instrument, "host": host}
    now = 0.0
    for _ in range(500):
        if not queue:
            # nothing on the wire: let the earliest timer fire
            pending = [(link.deadline, name) for name, link in links.items() if link.deadline is not None]
            if not pending:
                break
            now, name = min(pending)
            queue += [(name, e) for e in links[name].on_timer(now)]
            continue
        name, event = queue.pop(0)
        other = "host" if name == "instrument" else "instrument"
        got[name].append(event)
        if isinstance(event, Write):
            queue += [(other, e) for e in links[other].feed(event.data, now)]
        elif isinstance(event, MessageReceived):
            queue += [(name, e) for e in links[name].commit_done(event.token, True, now)]
    assert [m.body for m in of(got["host"], MessageReceived)] == [RESULT_LINES]
    assert [m.body for m in of(got["instrument"], MessageReceived)] == [order.replace(b"\r", b"\n")]
    assert [r.ok for r in of(got["host"] + got["instrument"], SendResult)] == [True, True]


def test_send_rejects_empty_message() -> None:
    with pytest.raises(ValueError):
        AstmLink().send(b"\r\n", 0.0)


def test_connection_lost_fails_queued_sends_and_discards_partial() -> None:
    link = AstmLink()
    link.feed(B_ENQ + frames_for_message(RESULT)[0], 0.0)
    message_id, _ = link.send(RESULT, 0.0)
    events = link.connection_lost(1.0)
    assert of(events, MessageDiscarded) == [MessageDiscarded("connection lost", 1)]
    assert of(events, SendResult) == [SendResult(message_id, False, "connection lost")]
    assert link.state is LinkState.NEUTRAL and link.deadline is None


# --------------------------------------------------------------------------- chunking invariant


def _stream() -> st.SearchStrategy[bytes]:
    frames = frames_for_message(RESULT)
    bad = bytearray(frames[1])
    bad[4] ^= 1
    parts = [B_ENQ, frames[0], bytes(bad), frames[1], frames[1], b"noise\x00", *frames[2:], B_EOT]
    return st.permutations(parts).map(lambda p: B_ENQ + b"".join(p) + B_EOT)


@settings(max_examples=150, deadline=None)
@given(data=st.one_of(st.just(session()), _stream(), st.binary(max_size=300)), cuts=st.lists(st.integers(0, 40), max_size=30))
def test_events_do_not_depend_on_chunking(data: bytes, cuts: list[int]) -> None:
    one, many = AstmLink(max_frame_size=60), AstmLink(max_frame_size=60)
    assert receive_all(one, data) == receive_all(many, data, chunks=cuts)
    assert (one.noise_bytes, one.state, one.deadline) == (many.noise_bytes, many.state, many.deadline)


# --------------------------------------------------------------------------- records


def test_parse_records_uses_header_delimiters() -> None:
    text = "H!@#$!!!Sender#Model!!!!!!!P!1\r1P!1!!ID#X\nR!1!@@@GLU!5.4\r\nL!1!N"
    records = parse_records(text)
    assert [r.type for r in records] == ["H", "P", "R", "L"]
    header = records[0]
    assert header.delimiters.field == "!" and header.delimiters.component == "#"
    assert header.field(2) == "@#$" and header.components(5) == ["Sender", "Model"]
    assert records[1].field(4) == "ID#X"  # a leading frame digit is dropped
    assert records[2].field(3) == "@@@GLU" and records[2].field(4) == "5.4"
    assert records[2].field(99) == ""


def test_parse_records_all_record_types_and_defaults() -> None:
    text = b"P|1\nO|1\nR|1\nC|1\nQ|1\nM|1\nS|1\nL|1"
    records = parse_records(text)
    assert "".join(r.type for r in records) == "PORCQMSL"
    assert records[0].delimiters == astm.AstmDelimiters()


def test_header_identity() -> None:
    records = parse_records(b"H|\\^&|CTRL42||Cobas^8000|||||||P|1\nL|1|N")
    assert astm.header_identity(records) == ("Cobas", "CTRL42")
    assert astm.header_identity(parse_records(b"R|1")) == ("", "")


def test_connection_lost_while_committing_is_not_a_discard() -> None:
    link = AstmLink()
    events = link.feed(session(), 0.0)
    assert of(events, MessageReceived)
    assert of(link.connection_lost(1.0), MessageDiscarded) == []


def test_input_while_committing_is_bounded() -> None:
    link = AstmLink(max_frame_size=100)
    link.feed(B_ENQ + b"".join(frames_for_message(RESULT)), 0.0)
    assert link.state is LinkState.COMMITTING
    link.feed(b"x" * 10_000, 0.0)
    assert link.noise_bytes == 10_000 - 116


def test_cancel_queued_and_in_progress_messages() -> None:
    link = AstmLink()
    first, _ = link.send(RESULT, 0.0)
    second, _ = link.send(RESULT, 0.0)
    assert link.cancel(second, 0.0) == [SendResult(second, False, "cancelled")]
    link.feed(B_ACK, 0.0)  # ENQ accepted; frame 1 on the wire
    events = link.cancel(first, 1.0)
    assert writes(events) == B_EOT and of(events, SendResult) == [SendResult(first, False, "cancelled")]
    assert link.state is LinkState.NEUTRAL and link.pending_sends == 0 and link.deadline is None
    assert link.cancel(first, 2.0) == []


def test_a_long_record_with_an_l_inside_does_not_end_the_message() -> None:
    """Message completion looks at the start of the last record, however long it is: put an
    'L' at every offset a fixed look-back window could start at."""
    header = b"H|\\^&\r"
    size = 9100
    last_piece = (size + 1) % 240 or 240  # the record's CR is part of its last frame
    accepted = len(header) + size + 1 - last_piece
    body = bytearray(b"x" * size)
    body[:6] = b"C|1|I|"
    for window in (1024, 2048, 4096, 8192):
        body[accepted - window - len(header)] = ord("L")
    frames = frames_for_message(header + bytes(body) + b"\rL|1|N\r")
    events = receive_all(AstmLink(), B_ENQ + b"".join(frames) + B_EOT)
    (message,) = of(events, MessageReceived)
    assert message.records == 3
