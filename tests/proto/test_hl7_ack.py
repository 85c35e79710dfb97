"""proto.hl7.parse_ack: the one MSA reader (HL7 v2.5 ch. 2.14.8), examples and hypothesis.

parse_ack is pure only (no Cython twin); it is checked against the ACKs both build_ack twins
write, against an independent reference reader, and for bytes/text agreement.
"""

from __future__ import annotations

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
