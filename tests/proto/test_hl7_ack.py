"""proto.hl7.parse_ack: the one MSA reader (HL7 v2.5 ch. 2.14.8), examples and hypothesis.

parse_ack is checked against the ACKs both build_ack twins write, against an independent
reference reader, and for bytes/text agreement. Its Cython twin reads text itself (the bot
replies the agent routes) and hands bytes to the pure twin; the differential tests at the end
compare the twins over random text, junk included, with the same result or the same error.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from testsupport import pick

from medagent import _compat
from medagent.proto import hl7
from medagent.proto.hl7 import AckInfo, Hl7Error, parse_ack


@pytest.mark.parametrize(
    "text,expected",
    [
        ("MSH|^~\\&|A|B\rMSA|AA|123|OK\r", AckInfo("AA", "123", "OK")),
        ("\ufeff\r\nMSH|^~\\&|A\nMSA|ce|9\n", AckInfo("ce", "9", "")),
        ("MSH#^~\\&#A\rMSA#AR#77#bad#x\r", AckInfo("AR", "77", "bad")),
        ("MSH|^~\\&|A\rPID|1\r", None),
        ("MSH|^~\\&|A\rMSA|\r", AckInfo("", "", "")),
        ("MSH|^~\\&|A\rMSA\r", None),  # no separator after MSA: not an MSA segment
        ("MSH|^~\\&|A\rXMSA|AA|1\rMSA|AE|2|second\r", AckInfo("AE", "2", "second")),
        ("MSH|^~\\&|MSA|AA|1\r", None),  # "MSA" inside the MSH is not a segment
        ("MSH|^~\\&\r\nMSA|AA|1|a\r\nERR|||207\r\n", AckInfo("AA", "1", "a")),
    ],
)
def test_parse_ack_examples(text: str, expected: AckInfo | None) -> None:
    assert parse_ack(text) == expected
    assert parse_ack(text.encode("utf-8")) == expected
    assert parse_ack(bytearray(text.encode("utf-8"))) == expected


@pytest.mark.parametrize("junk", ["MSH1abc", "error: bot crashed", "", "MSH", " MSA|AA|1", "MSH |x"])
def test_not_hl7_is_hl7error(junk: str) -> None:
    with pytest.raises(Hl7Error):
        parse_ack(junk)
    with pytest.raises(Hl7Error):
        parse_ack(junk.encode())


def test_wide_and_latin1_acks() -> None:
    text = "MSH|^~\\&|A\rMSA|AE|Ü1|Fehler für Müller\r"
    for codec in ("utf-16", "utf-16-le", "utf-16-be", "utf-32"):
        assert parse_ack(text.encode(codec)) == AckInfo("AE", "Ü1", "Fehler für Müller")
    # ASCII-compatible bytes: raw values as latin-1, as header fields are
    info = parse_ack(text.encode("utf-8"))
    assert info is not None and info.text.encode("latin-1").decode("utf-8") == "Fehler für Müller"


#: the twins in force: the C one is absent in pure mode (MEDAGENT_NO_EXTENSIONS), never silently
IMPLS = ["py"] if _compat.NO_EXTENSIONS else ["py", "c"]
_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="|^~\\&"),
                 max_size=12)


@settings(max_examples=300, deadline=None)
@given(code=st.sampled_from(sorted(hl7.ACK_CODES)), control_id=_VALUE, text=_VALUE,
       error=st.one_of(st.none(), _VALUE), impl=st.sampled_from(IMPLS),
       charset=st.sampled_from(["", "UNICODE UTF-8", "8859/1"]))
def test_parse_ack_reads_what_build_ack_writes(code: str, control_id: str, text: str, error: str | None,
                                                impl: str, charset: str) -> None:
    message = (f"MSH|^~\\&|LAB|HOSP|ME|CLOUD|20240101||ADT^A01|{control_id}|P|2.5|||||{charset}\r"
               "PID|1\r").encode("latin-1")
    ack = pick(hl7, "build_ack", impl)(message, code, text, error)
    assert parse_ack(ack) == AckInfo(code, control_id, text)
    assert parse_ack(ack.decode("latin-1")) == parse_ack(ack)


def _reference_msa(frame: bytes) -> tuple[bytes, bytes] | None:
    """An independent MSA reader (the load generator's before parse_ack existed), for ASCII input."""
    start = frame.find(b"MSA")
    while start > 0 and frame[start - 1] not in b"\r\n":
        start = frame.find(b"MSA", start + 1)
    if start < 0:
        return None
    separator = frame[start + 3:start + 4]
    end = len(frame)
    for terminator in (b"\r", b"\n"):
        position = frame.find(terminator, start)
        if 0 <= position < end:
            end = position
    fields = frame[start + 4:end].split(separator, 2)
    return fields[0], fields[1] if len(fields) > 1 else b""


_SEGMENT_BYTES = st.lists(st.sampled_from([b"|", b"^", b"A", b"1", b"MSA", b"M", b" ", b"x"]), max_size=8).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(segments=st.lists(_SEGMENT_BYTES, max_size=5), msa=st.one_of(st.none(), _SEGMENT_BYTES),
       terminator=st.sampled_from([b"\r", b"\n", b"\r\n"]))
def test_parse_ack_agrees_with_the_reference_reader(segments: list[bytes], msa: bytes | None,
                                                     terminator: bytes) -> None:
    body = [b"MSH|^~\\&|A"] + [b"Z" + s for s in segments]  # no stray segment starts with MSA
    if msa is not None:
        body.append(b"MSA|" + msa)
    frame = terminator.join(body) + terminator
    info = parse_ack(frame)
    reference = _reference_msa(frame)
    if reference is None:
        assert info is None
    else:
        assert info is not None
        assert (info.code.encode("latin-1"), info.control_id.encode("latin-1")) == reference


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_parse_ack_total_on_random_bytes(data: bytes) -> None:
    try:
        parse_ack(data)
    except Hl7Error:
        pass


# --------------------------------------------------------------------------- the twins agree

def _outcome(function: Callable[[str], AckInfo | None], text: str) -> tuple[str, object]:
    try:
        return "ok", function(text)
    except Hl7Error as exc:
        return "error", str(exc)


def _assert_twins_agree(text: str) -> None:
    assert hl7.parse_ackC is not None
    assert _outcome(hl7.parse_ackC, text) == _outcome(hl7.parse_ackPy, text), repr(text)


needs_c_twin = pytest.mark.skipif(hl7.parse_ackC is None, reason="pure mode: no C twin to compare")

#: pieces that exercise every branch: BOM, leading whitespace, MSH and look-alikes, separators
#: (punctuation, letters, digits, non-ASCII), MSA at and off a segment start, every terminator
_PIECES = ["\ufeff", " ", "\t", "\x0b", "\x0c", "\r", "\n", "\r\n", "MSH", "MS", "MSA", "|", "#", "^", "A",
           "1", "é", "\u4e2d", "\U0001F600", "~", "&", "\\", "AA", "x"]


@needs_c_twin
@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=24).map("".join))
def test_twins_agree_on_text_built_from_msh_and_msa_pieces(text: str) -> None:
    _assert_twins_agree(text)


@needs_c_twin
@settings(max_examples=500, deadline=None)
@given(st.text(max_size=64))
def test_twins_agree_on_arbitrary_text(text: str) -> None:
    _assert_twins_agree(text)


@needs_c_twin
@settings(max_examples=300, deadline=None)
@given(prefix=st.sampled_from(["", "\ufeff", " \r\n", "\ufeff\t"]), separator=st.sampled_from(list("|#!~{`") + ["A", "1", "é"]),
       segments=st.lists(_VALUE, max_size=4), msa=st.lists(_VALUE, max_size=5),
       terminator=st.sampled_from(["\r", "\n", "\r\n", ""]))
def test_twins_agree_on_acks_with_any_separator(prefix: str, separator: str, segments: list[str], msa: list[str],
                                                terminator: str) -> None:
    body = [f"MSH{separator}^~\\&{separator}A"] + ["ZZZ" + separator + s for s in segments]
    body.append(separator.join(["MSA", *msa]))
    _assert_twins_agree(prefix + terminator.join(body) + terminator)


@needs_c_twin
@pytest.mark.parametrize("text", ["", "\ufeff", "MSH|", "MSH|\rMSA|AA", "\ufeffMSH|^~\\&\nMSA|AE|7|t|x\r",
                                  "MSH|\rXMSA|AA|1\nMSA|AR|2", "MSH1\rMSA1AA", "  \r\n\t", "MSH|\rMSA|"])
def test_twins_agree_on_edge_cases(text: str) -> None:
    _assert_twins_agree(text)


@needs_c_twin
def test_the_c_twin_hands_bytes_and_str_subclasses_to_the_pure_one() -> None:
    class Text(str):
        pass

    raw = "MSH|^~\\&|A\rMSA|AE|Ü1|Fehler\r"
    assert hl7.parse_ackC is not None
    for value in (raw.encode("utf-16"), raw.encode("utf-8"), bytearray(raw.encode("utf-8")), Text(raw)):
        assert hl7.parse_ackC(value) == hl7.parse_ackPy(value)


def test_the_selected_parse_ack_is_the_c_twin_unless_pure_mode() -> None:
    assert hl7.parse_ack is (hl7.parse_ackPy if _compat.NO_EXTENSIONS else hl7.parse_ackC)
