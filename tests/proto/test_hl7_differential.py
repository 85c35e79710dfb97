"""Differential tests: the Cython HL7 kernel gives exactly the pure twin's results.

Random MSH headers (random separators, random field contents without separators or
terminators, truncation anywhere from MSH-10 on, random terminators, optional BOM and leading
whitespace, sometimes UTF-16) followed by random segments; plus arbitrary bytes, which must give
the same result or the same exception type. ACKs are compared with fixed MSH-7/MSH-10 and with
random caller text (delimiters, CR/LF, non-ASCII) and codes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medagent.proto import hl7

pytestmark = pytest.mark.skipif(hl7.parse_headerC is None, reason="pure mode: no C twin to compare")

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TS = "20240102030405"
CID = "DIFF0001"

PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
CHARSETS = ["", "UNICODE UTF-8", "8859/1", "ASCII", "KLINGON", "~ISO IR87", "UNICODE UTF-16",
            "GB 18030", "8859/15~ISO IR87"]


def outcome(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """("ok", comparable result) or ("error", exception type)."""
    try:
        result = function(*args, **kwargs)
    except (ValueError, TypeError, AttributeError) as exc:
        return "error", type(exc)
    if hasattr(result, "as_dict"):
        return "ok", result.as_dict()
    return "ok", result


def assert_same(name: str, *args: Any, **kwargs: Any) -> None:
    py = outcome(getattr(hl7, name + "Py"), *args, **kwargs)
    c = outcome(getattr(hl7, name + "C"), *args, **kwargs)
    assert py == c, (name, args[1:], kwargs)


@st.composite
def separators(draw: st.DrawFn) -> tuple[str, str]:
    """(MSH-1, MSH-2): usually four distinct characters, sometimes short, long or odd."""
    field = draw(st.sampled_from(PUNCTUATION))
    others = [char for char in PUNCTUATION if char != field]
    kind = draw(st.sampled_from(["standard", "standard", "distinct", "short", "five", "any"]))
    if kind == "standard" and field == "|":
        return field, "^~\\&"
    if kind == "short":
        return field, "".join(draw(st.lists(st.sampled_from(others), max_size=3, unique=True)))
    if kind == "five":
        return field, "".join(draw(st.lists(st.sampled_from(others), min_size=5, max_size=5,
                                            unique=True)))
    if kind == "any":  # duplicates and letters: garbage in, but the twins must still agree
        return field, "".join(draw(st.lists(st.sampled_from(others + list("AZ az")),
                                            max_size=6)))
    return field, "".join(draw(st.lists(st.sampled_from(others), min_size=4, max_size=4,
                                        unique=True)))


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    field, encoding_characters = draw(separators())
    forbidden = set(field + "\r\n")
    alphabet = st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                             exclude_characters="".join(forbidden))
    value = st.text(alphabet, max_size=10)
    component = encoding_characters[:1] or "^"
    message_type = draw(st.one_of(
        st.sampled_from(["ADT^A01^ADT_A01", "ORM^O01", "ADT", "", "ADT^A01^", "ADT^^X"]),
        st.lists(value, max_size=4).map(lambda parts: "^".join(parts)),
    )).replace("^", component) if component not in forbidden else ""
    fields = draw(st.lists(value, min_size=16, max_size=16))  # MSH-3 .. MSH-18
    fields[6] = message_type  # MSH-9
    fields[15] = draw(st.sampled_from(CHARSETS)).replace("~", encoding_characters[1:2] or "~") \
        if draw(st.booleans()) else fields[15]
    fields += draw(st.lists(value, max_size=4))  # MSH-19..
    last = draw(st.integers(min_value=10, max_value=len(fields) + 2))  # truncated after MSH-last
    header = field.join(["MSH", encoding_characters, *fields[: last - 2]])
    segment_alphabet = st.characters(min_codepoint=0x20, max_codepoint=0x2FF,
                                     exclude_characters="\r\n")
    segments = draw(st.lists(st.text(segment_alphabet, max_size=30), max_size=5))
    terminator = draw(st.sampled_from(["\r", "\n", "\r\n", "\r\r", "\n\n\r"]))
    text = terminator.join([header, *segments])
    if draw(st.booleans()):
        text += terminator
    text = draw(st.sampled_from(["", "", "\r\n", " \t", "\x0b"])) + text
    encoding = draw(st.sampled_from(["latin-1", "latin-1", "latin-1", "utf-8-bom", "utf-16-le",
                                     "utf-16-le-bom", "utf-16-be-bom"]))
    if encoding == "latin-1":
        return text.encode("latin-1", "replace")
    if encoding == "utf-8-bom":
        return b"\xef\xbb\xbf" + text.encode("utf-8")
    if encoding == "utf-16-le":
        return text.encode("utf-16-le")
    bom = b"\xff\xfe" if encoding == "utf-16-le-bom" else b"\xfe\xff"
    return bom + text.encode(encoding[:9])


caller_text = st.one_of(
    st.none(),
    st.text(max_size=20),
    st.text(st.sampled_from(list("ab |^~\\&#\r\n!") + ["ü", "東"]), max_size=12),
)


@SETTINGS
@given(message=messages())
def test_parse_header_and_split(message: bytes) -> None:
    assert_same("parse_header", message)
    assert_same("split_segments", message)
    assert_same("decode", message)


@SETTINGS
@given(
    message=messages(),
    code=st.sampled_from(["AA", "AE", "AR", "CA", "CE", "CR", "XX"]),
    text=caller_text,
    error=caller_text,
    error_code=st.sampled_from(["207", "100", "205", "9|9", "ü"]),
    timestamp=st.sampled_from([TS, "2024^01", "2024\r"]),
    control_id=st.sampled_from([CID, "ID|1", "Zoë", ""]),
)
def test_build_ack(message: bytes, code: str, text: str | None, error: str | None,
                   error_code: str, timestamp: str, control_id: str) -> None:
    assert_same("build_ack", message, code, text, error, timestamp=timestamp,
                control_id=control_id, error_code=error_code)


@SETTINGS
@given(data=st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(lambda tail: b"MSH|" + tail),
    st.binary(max_size=64).map(lambda tail: b"\xef\xbb\xbfMSH^~|\\&^" + tail),
    st.binary(max_size=64).map(lambda tail: b"\xff\xfeM\x00S\x00H\x00|\x00" + tail),
))
def test_arbitrary_bytes(data: bytes) -> None:
    assert_same("parse_header", data)
    assert_same("split_segments", data)
    assert_same("decode", data)
    assert_same("build_ack", data, "AE", "t|x", "e", timestamp=TS, control_id=CID)
