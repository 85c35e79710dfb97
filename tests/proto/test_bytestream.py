"""Byte-stream framing with Medplum's newest semantics (bytestream.ts), plus a frame-size cap."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medagent.proto.bytestream import (
    AutoRespondRule,
    ByteStreamConfig,
    ByteStreamFramer,
    Frame,
    FrameTooLarge,
    Respond,
    filter_frame,
)

STX, ETX, ENQ, EOT = 0x02, 0x03, 0x05, 0x04


def frames(events: list[Any]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, Frame)]


def test_frame_is_start_through_end_inclusive_and_outside_bytes_dropped() -> None:
    framer = ByteStreamFramer(ByteStreamConfig(STX, ETX))
    events = framer.feed(b"junk\x02hello\x03more\x02world\x03tail")
    assert frames(events) == [b"\x02hello\x03", b"\x02world\x03"]
    assert framer.discarded_bytes == len(b"junk") + len(b"more") + len(b"tail")


def test_start_char_restarts_the_frame() -> None:
    framer = ByteStreamFramer(ByteStreamConfig(STX, ETX))
    assert frames(framer.feed(b"\x02partial\x02whole\x03")) == [b"\x02whole\x03"]


def test_end_without_start_is_ignored() -> None:
    framer = ByteStreamFramer(ByteStreamConfig(STX, ETX))
    assert frames(framer.feed(b"\x03abc\x03\x02x\x03")) == [b"\x02x\x03"]


def test_frame_spans_reads() -> None:
    framer = ByteStreamFramer(ByteStreamConfig(STX, ETX))
    assert framer.feed(b"\x02ab") == []
    assert framer.pending_bytes == 3
    assert frames(framer.feed(b"c\x03")) == [b"\x02abc\x03"]


def test_auto_respond_answers_when_pattern_completes_before_framing() -> None:
    # Medplum's documented ASTM workaround: ACK on ENQ, ETX and ETB; frames ENQ..EOT.
    config = ByteStreamConfig(
        ENQ, EOT,
        auto_respond=(AutoRespondRule(b"\x05", b"\x06"), AutoRespondRule(b"\x03", b"\x06"),
                      AutoRespondRule(b"\x17", b"\x06")),
    )
    events = ByteStreamFramer(config).feed(b"\x05\x021H|\\^&\r\x03AB\r\n\x04")
    assert events == [Respond(b"\x06"), Respond(b"\x06"), Frame(b"\x05\x021H|\\^&\r\x03AB\r\n\x04")]


def test_auto_respond_multi_byte_pattern_and_window_reset_at_start() -> None:
    config = ByteStreamConfig(STX, ETX, auto_respond=(AutoRespondRule(b"ab", b"!"),))
    framer = ByteStreamFramer(config)
    assert [e for e in framer.feed(b"xab") if isinstance(e, Respond)] == [Respond(b"!")]
    # the start char between a and b resets the window: no match
    assert [e for e in framer.feed(b"a\x02b") if isinstance(e, Respond)] == []
    # patterns match between frames as readily as inside one
    assert [e for e in framer.feed(b"\x03ab") if isinstance(e, Respond)] == [Respond(b"!")]


def test_auto_respond_every_completed_rule_in_order() -> None:
    config = ByteStreamConfig(STX, ETX, auto_respond=(AutoRespondRule(b"b", b"1"), AutoRespondRule(b"ab", b"2")))
    assert ByteStreamFramer(config).feed(b"ab") == [Respond(b"1"), Respond(b"2")]


def test_strip_sequence_longest_first_and_whole_occurrences() -> None:
    assert filter_frame(b"\x02a\r\nb\rc\x03", [b"\r", b"\r\n"], False) == b"\x02abc\x03"
    assert filter_frame(b"aXYXb", [b"XYX", b"YX"], False) == b"ab"
    config = ByteStreamConfig(STX, ETX, strip_sequences=(b"\r\n",))
    assert frames(ByteStreamFramer(config).feed(b"\x02a\r\nb\x03")) == [b"\x02ab\x03"]


def test_strip_control_chars_with_keep() -> None:
    raw = b"\x02H|1\r\n\x00R|2\r\x03"
    assert filter_frame(raw, [], True) == b"H|1R|2"
    assert filter_frame(raw, [], True, {0x0D, 0x0A}) == b"H|1\r\nR|2\r"
    assert filter_frame(raw, [], False, {0x0D}) == raw  # keep has no effect without strip
    config = ByteStreamConfig(STX, ETX, strip_control_chars=True, keep_control_chars=frozenset({0x0D}))
    assert frames(ByteStreamFramer(config).feed(raw)) == [b"H|1\rR|2\r"]


def test_max_frame_size_drops_oversize_frame_and_resyncs() -> None:
    framer = ByteStreamFramer(ByteStreamConfig(STX, ETX, max_frame_size=5))
    events = framer.feed(b"\x02abcdefgh\x03\x02abc\x03\x02abcd\x03")
    assert events == [FrameTooLarge(5), Frame(b"\x02abc\x03"), FrameTooLarge(5)]
    assert framer.pending_bytes == 0


def test_frame_of_exactly_max_size_is_accepted() -> None:
    framer = ByteStreamFramer(ByteStreamConfig(STX, ETX, max_frame_size=5))
    assert frames(framer.feed(b"\x02abc\x03")) == [b"\x02abc\x03"]


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        ByteStreamConfig(STX, STX)
    with pytest.raises(ValueError):
        ByteStreamConfig(STX, 256)
    with pytest.raises(ValueError):
        ByteStreamConfig(STX, ETX, max_frame_size=0)


_CONFIGS = [
    ByteStreamConfig(STX, ETX, max_frame_size=8),
    ByteStreamConfig(STX, ETX, auto_respond=(AutoRespondRule(b"\x02", b"A"), AutoRespondRule(b"ab", b"B")), max_frame_size=8),
    ByteStreamConfig(STX, ETX, strip_sequences=(b"ab", b"b"), strip_control_chars=True, keep_control_chars=frozenset({3})),
]


@settings(max_examples=300, deadline=None)
@given(
    config=st.sampled_from(_CONFIGS),
    data=st.lists(st.sampled_from([b"\x02", b"\x03", b"a", b"b", b"\r", b"xyz"]), max_size=60).map(b"".join),
    cuts=st.lists(st.integers(0, 12), max_size=20),
)
def test_output_does_not_depend_on_chunking(config: ByteStreamConfig, data: bytes, cuts: list[int]) -> None:
    whole = ByteStreamFramer(config)
    expected = whole.feed(data)
    chunked = ByteStreamFramer(config)
    got: list[Any] = []
    pos = 0
    for size in cuts:
        got += chunked.feed(data[pos : pos + size])
        pos += size
    got += chunked.feed(data[pos:])
    assert got == expected
    assert (chunked.discarded_bytes, chunked.pending_bytes) == (whole.discarded_bytes, whole.pending_bytes)


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.sampled_from([b"\x02", b"\x03", b"a", b"bc"]), max_size=60).map(b"".join),
       limit=st.integers(1, 10))
def test_fast_path_equals_per_byte_path(data: bytes, limit: int) -> None:
    """Without autoRespond the framer scans with find(); it must match the per-byte rules."""
    fast = ByteStreamFramer(ByteStreamConfig(STX, ETX, max_frame_size=limit))
    slow = ByteStreamFramer(ByteStreamConfig(STX, ETX, max_frame_size=limit))
    slow_events: list[Any] = []
    for byte in data:
        slow._byte(byte, slow_events)
    assert fast.feed(data) == slow_events
    assert fast.discarded_bytes == slow.discarded_bytes


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.sampled_from([b"\x02", b"\x03", b"a", b"b", b"ab", b"xyz"]), max_size=60).map(b"".join),
       limit=st.integers(1, 10))
def test_rules_path_equals_per_byte_path(data: bytes, limit: int) -> None:
    """With autoRespond the framer handles plain runs in bulk; it must match the per-byte rules."""
    rules = (AutoRespondRule(b"ab", b"1"), AutoRespondRule(b"\x03", b"2"), AutoRespondRule(b"b\x02a", b"3"))
    bulk = ByteStreamFramer(ByteStreamConfig(STX, ETX, auto_respond=rules, max_frame_size=limit))
    slow = ByteStreamFramer(ByteStreamConfig(STX, ETX, auto_respond=rules, max_frame_size=limit))
    slow_events: list[Any] = []
    for byte in data:
        slow._byte(byte, slow_events)
    assert bulk.feed(data) == slow_events
    assert (bulk.discarded_bytes, bulk.pending_bytes) == (slow.discarded_bytes, slow.pending_bytes)
