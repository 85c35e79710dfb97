"""HL7 v2 header scan, segment split, charset decoding and ACK building: the pure-Python twin.

This module is the specification; `medagent._fast._hl7` (the Cython twin) must give identical
results. Users import `medagent.proto.hl7`, never this module.

Standard: HL7 v2.x chapter 2 (v2.5.1 numbering): 2.5 message construction rules (segment
terminator, field/component/repetition/escape/subcomponent separators declared by MSH-1 and
MSH-2, 2.7 escape sequences), 2.9 acknowledgment rules (original and enhanced mode), 2.14.9
MSH, 2.14.8 MSA, 2.14.5 ERR (v2.5 layout), HL7 table 0211 (alternate character sets) and table
0357 (message error condition codes).

Theory of operation
-------------------
*Finding the MSH.* A message may start with a byte-order mark and with whitespace (space, tab,
CR, LF, VT, FF); after that it must start with ``MSH`` and a field separator, an ASCII
punctuation character (0x21..0x7E, not a letter or digit). The MSH segment ends at the first CR
or LF. MSH-1 is that separator; MSH-2 (the encoding characters) runs up to the next field
separator; MSH-n for n >= 2 is the (n-1)-th piece of the segment split on the field separator.
Missing fields (a message truncated after MSH-10, say) are "". Anything else is `Hl7Error`.

*Encodings.* A message is "wide" when it starts with a UTF-32 or UTF-16 byte-order mark, or
when its first two bytes show ASCII text in UTF-16 (``M\\0`` little endian, ``\\0M`` big
endian; this is how a UTF-16 message declared as ``UNICODE UTF-16`` in MSH-18 but sent without
a BOM is detected). A wide message is decoded before its header is read. Every other message
is "ASCII-compatible": its header is read byte-wise and field values are the raw bytes decoded
as latin-1, so that ``value.encode("latin-1")`` gives back the exact bytes, whatever MSH-18
says. A UTF-8 BOM is skipped. Header reading never fails on bad text (wide messages are
decoded with replacement characters there): an application reject can always be built for a
message whose MSH is readable. `decode` is the strict one.

*Separators.* MSH-2 gives component, repetition, escape, subcomponent and (v2.7+) truncation
characters in that order; positions missing from a short MSH-2 take the standard values
``^ ~ \\ &`` (no truncation character).

*Character sets.* `decode` takes the charset from a BOM first (UTF-8, UTF-16 LE/BE, UTF-32
LE/BE), else from MSH-18 (table 0211) through `codec_for_charset`, else uses `default`. Table
0211 names map as follows: ASCII and ISO IR6 -> ascii; 8859/1..8859/16 (not 12, which does not
exist) -> iso8859-N; UNICODE and UNICODE UTF-8 -> utf-8 (UNICODE names no encoding form; UTF-8
is what senders mean by it in practice, and real UTF-16 is caught by its bytes); UNICODE UTF-16
-> utf-16, UNICODE UTF-32 -> utf-32; GB 18030 -> gb18030; KS X 1001 -> euc_kr; BIG-5 -> big5;
ISO IR87 (JIS X 0208) and ISO IR14 (JIS X 0201 Roman) -> iso2022_jp, because HL7 carries these
sets with ISO 2022 escape sequences (as DICOM does), not as Shift_JIS; ISO IR159 (JIS X 0212)
-> iso2022_jp_2, the Python codec that has JIS X 0212. CNS 11643-1992 is recognised but has no
Python codec: `Hl7Error` says so. Common non-standard spellings are accepted because names are
compared case-insensitively with spaces, ``-``, ``_`` and ``/`` removed ("UTF-8", "UTF8",
"ISO-8859-1", "iso8859_1" ...). Only MSH-18's first repetition selects the codec, except for the
ISO 2022 code-extension form used in Japan (e.g. ``~ISO IR87`` or ``ASCII~ISO IR87``): when a
later repetition names a JIS set and the first is empty, ASCII, ISO IR6 or ISO IR14, the message
is decoded with iso2022_jp_2, which starts in ASCII and follows the escape sequences.

*ACK* (ch. 2.9, shaped like Medplum's ``Hl7Message.buildAck``): the MSH reuses the message's own
MSH-1/MSH-2, swaps MSH-3/4 with MSH-5/6, sets MSH-7 to `timestamp` or the current local time as
YYYYMMDDHHMMSS (the formatted second is cached), MSH-9 to ``ACK<c>trigger<c>ACK`` when the
original MSH-9 has a non-empty trigger event and message structure, ``ACK<c>trigger`` when it has
only a trigger event, else ``ACK`` (<c> = the component separator), MSH-10 to `control_id` or
`make_control_id()`, MSH-11 to the original MSH-11 or "P", MSH-12 to the original MSH-12 or
"2.5.1", and MSH-18 to the original MSH-18 (all repetitions) when present. Then
``MSA|code|<original MSH-10>|text`` (text defaults to Medplum's words for the code), and, when
`error` is given, ``ERR|||code^table-0357 text^HL70357|E||||error`` (ERR-3 HL7 error code,
ERR-4 severity, ERR-8 user message). Segments end with CR. Values supplied by the caller
(text, error, error_code, timestamp, control_id) are escaped with the message's escape character
(\\F\\ \\S\\ \\R\\ \\E\\ \\T\\, \\P\\ for a v2.7 truncation character, \\X0D\\ and \\X0A\\ for CR/LF) and
encoded with the message's charset (replacement on unencodable characters; latin-1 when MSH-18
is empty, ASCII when MSH-18 is unknown); values copied from the message are copied raw. A wide
message gets a wide ACK (same encoding, with BOM); any other gets bytes in its own encoding.

*Reading an ACK* (ch. 2.14.8 MSA): `parse_ack` finds the message's MSH exactly as
`parse_header` does (Hl7Error without one), then the first segment that starts with ``MSA`` and
MSH-1; MSA-1 (code), MSA-2 (the acknowledged MSH-10) and MSA-3 (text) are returned raw (escape
sequences kept; for ASCII-compatible bytes, the raw bytes as latin-1, like header fields), ""
when absent. No MSA segment: None. It is the one MSA reader of the package (outbound client,
bot replies, ``medagent send``, the load generator). It takes text as well as bytes (a bot's
reply arrives as text); text is read like a decoded message.

*Control ids* are ``PPPPPPQQQQQTn``: PPPPPP = base-36 seconds (mod 36**6) when the generator was
seeded, QQQQQ = base-36 process id, T = a tag per generator (P here, C in the Cython twin), n =
a hex counter. At most 20 characters; when the counter would need a ninth hex digit the
generator reseeds with a later time; a forked child reseeds with its own pid.

Invariants: no function here logs or puts message text into exception messages (PHI); sizes,
offsets and charset names only. `parse_header` and `build_ack` accept exactly the same messages.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, NamedTuple

__all__ = [
    "ACK_CODES",
    "DEFAULT_PROCESSING_ID",
    "DEFAULT_VERSION",
    "ERROR_CODE_TEXT",
    "AckInfo",
    "Header",
    "Hl7Error",
    "Separators",
    "build_ack",
    "codec_for_charset",
    "current_timestamp",
    "decode",
    "format_timestamp",
    "make_control_id",
    "new_control_id_prefix",
    "parse_ack",
    "parse_header",
    "split_segments",
]


class Hl7Error(ValueError):
    """An HL7 v2 message cannot be read as such.

    Raised when a message has no readable MSH segment at its start, when MSH-18 names a
    character set that is unknown or has no Python codec, and when the text does not decode in
    its declared character set. The message says which; it never contains message text.
    """


#: MSA-1 acknowledgment codes (HL7 table 0008) and the MSA-3 text Medplum sends for each.
ACK_CODES: Final[dict[str, str]] = {
    "AA": "OK",
    "AE": "Application Error",
    "AR": "Application Reject",
    "CA": "Commit Accept",
    "CE": "Commit Error",
    "CR": "Commit Reject",
}

#: HL7 table 0357 (message error condition codes): code -> text, for ERR-3.
ERROR_CODE_TEXT: Final[dict[str, str]] = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "104": "Value too long",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

DEFAULT_VERSION: Final = "2.5.1"
DEFAULT_PROCESSING_ID: Final = "P"
ERROR_TABLE_NAME: Final = "HL70357"
ERROR_SEVERITY: Final = "E"
SEGMENT_TERMINATOR: Final = "\r"

# ---------------------------------------------------------------------------------------------
# Encoding detection
# ---------------------------------------------------------------------------------------------

#: (byte-order mark, codec of the text after it, or None for ASCII-compatible UTF-8).
#: Order matters: the UTF-32 LE mark starts with the UTF-16 LE one.
_BOMS: Final[tuple[tuple[bytes, str | None], ...]] = (
    (b"\xef\xbb\xbf", None),
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)
_WIDE_BOM: Final[dict[str, bytes]] = {codec: bom for bom, codec in _BOMS if codec is not None}

_WHITESPACE_BYTES: Final = re.compile(rb"[ \t\r\n\x0b\x0c]*")
_WHITESPACE_TEXT: Final = re.compile(r"[ \t\r\n\x0b\x0c]*")
_SEGMENT_BYTES: Final = re.compile(rb"[^\r\n]+")
_SEGMENT_TEXT: Final = re.compile(r"[^\r\n]+")


def sniff_encoding(message: bytes) -> tuple[str | None, int]:
    """(wide codec or None, length of the byte-order mark) for a raw message.

    None means ASCII-compatible (bytes are read as they are). A wide codec is a UTF-16/32 codec
    with explicit byte order, found from a BOM or from the NUL pattern of UTF-16 ASCII text.
    """
    if message[:1] == b"M" and message[1:2] != b"\x00":  # the usual case: "MSH" at offset 0
        return None, 0
    for bom, codec in _BOMS:
        if message.startswith(bom):
            return codec, len(bom)
    if len(message) >= 2:
        first, second = message[0], message[1]
        if first and not second:
            return "utf-16-le", 0
        if second and not first:
            return "utf-16-be", 0
    return None, 0


def encode_wide(text: str, codec: str) -> bytes:
    """`text` in a wide codec, with that codec's byte-order mark first."""
    return _WIDE_BOM[codec] + text.encode(codec, "replace")


# ---------------------------------------------------------------------------------------------
# MSH reading
# ---------------------------------------------------------------------------------------------


def as_bytes(message: bytes | bytearray | memoryview) -> bytes:
    """`message` as bytes (bytearray and memoryview are copied); TypeError for anything else."""
    if isinstance(message, bytes):
        return message
    if isinstance(message, (bytearray, memoryview)):
        return bytes(message)
    raise TypeError(f"an HL7 message must be bytes, not {type(message).__name__}")


def no_msh_error(size: int) -> Hl7Error:
    """The error for a message without a readable MSH (shared with the Cython twin)."""
    return Hl7Error(
        f"no readable MSH segment: the message ({size} bytes) does not start with 'MSH' and a "
        "field separator (an ASCII punctuation character) after an optional byte-order mark "
        "and whitespace"
    )


def is_field_separator(char: str) -> bool:
    """MSH-1 must be ASCII punctuation: printable, not a letter, digit or space."""
    return "!" <= char <= "~" and not char.isalnum()


def _first_line(buffer: bytes | str, start: int, whitespace: re.Pattern, cr: bytes | str,
                lf: bytes | str) -> tuple[int, int]:
    """(start, end) of the first line of `buffer` after `start` and any leading whitespace."""
    begin = whitespace.match(buffer, start).end()  # type: ignore[union-attr]
    end = buffer.find(cr, begin)  # type: ignore[arg-type]
    if end < 0:
        end = len(buffer)
    lf_at = buffer.find(lf, begin, end)  # type: ignore[arg-type]
    return begin, (lf_at if lf_at >= 0 else end)


class _Msh(NamedTuple):
    """The MSH segment split on its field separator; `fields[n - 1]` is MSH-n for n >= 2."""

    wide: str | None  # the wide codec the message is in, or None (ASCII-compatible)
    separator: str  # MSH-1
    fields: list[str]

    def get(self, number: int) -> str:
        """MSH-`number` (2..), "" when absent."""
        index = number - 1
        return self.fields[index] if index < len(self.fields) else ""


def read_msh(message: bytes) -> _Msh:
    """Split the message's MSH segment (see the module docstring); Hl7Error if there is none."""
    message = as_bytes(message)
    wide, bom_length = sniff_encoding(message)
    if wide is None:
        begin, end = _first_line(message, bom_length, _WHITESPACE_BYTES, b"\r", b"\n")
        segment = message[begin:end].decode("latin-1")
    else:
        text = message[bom_length:].decode(wide, "replace")
        begin, end = _first_line(text, 0, _WHITESPACE_TEXT, "\r", "\n")
        segment = text[begin:end]
    if len(segment) < 4 or not segment.startswith("MSH") or not is_field_separator(segment[3]):
        raise no_msh_error(len(message))
    return _Msh(wide, segment[3], segment.split(segment[3]))


# ---------------------------------------------------------------------------------------------
# Separators and escaping (ch. 2.7)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Separators:
    """The delimiters declared by MSH-1 and MSH-2, with standard defaults for missing ones."""

    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str
    truncation: str  # "" before v2.7 / when MSH-2 has only four characters
    escape_table: dict[int, str]  # str.translate table that escapes a value


@lru_cache(maxsize=256)
def separators(field: str, encoding_characters: str) -> Separators:
    """Separators for MSH-1 = `field`, MSH-2 = `encoding_characters` (cached per pair)."""
    padded = encoding_characters + "^~\\&"[len(encoding_characters):]
    component, repetition, escape, subcomponent = padded[0], padded[1], padded[2], padded[3]
    truncation = encoding_characters[4] if len(encoding_characters) >= 5 else ""
    table: dict[int, str] = {}
    for char, code in ((truncation, "P"), (subcomponent, "T"), (repetition, "R"),
                       (component, "S"), (field, "F"), (escape, "E")):
        if char:
            table[ord(char)] = f"{escape}{code}{escape}"
    table[ord("\r")] = f"{escape}X0D{escape}"
    table[ord("\n")] = f"{escape}X0A{escape}"
    return Separators(field, component, repetition, escape, subcomponent, truncation, table)


def encode_value(value: str, seps: Separators, codec: str | None) -> str:
    """A caller-supplied value ready to insert: escaped, then for an ASCII-compatible message
    (`codec` given) encoded with `codec` and viewed as latin-1, like the raw fields are."""
    escaped = value.translate(seps.escape_table)
    if codec is None:
        return escaped
    return escaped.encode(codec, "replace").decode("latin-1")


# ---------------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """The MSH fields an integration engine routes and acknowledges by (HL7 v2 ch. 2.14.9).

    Values are raw (escape sequences are kept). For ASCII-compatible messages they are the raw
    bytes decoded as latin-1; for UTF-16/32 messages, the decoded text. Absent fields are "".
    """

    field_separator: str  # MSH-1
    encoding_characters: str  # MSH-2
    sending_application: str  # MSH-3
    sending_facility: str  # MSH-4
    receiving_application: str  # MSH-5
    receiving_facility: str  # MSH-6
    timestamp: str  # MSH-7
    message_type: str  # MSH-9, whole (e.g. "ADT^A01^ADT_A01")
    control_id: str  # MSH-10
    processing_id: str  # MSH-11
    version: str  # MSH-12
    accept_ack_type: str  # MSH-15
    app_ack_type: str  # MSH-16
    charset: str  # MSH-18, first repetition

    @property
    def component_separator(self) -> str:
        return self.encoding_characters[:1] or "^"

    @property
    def message_code(self) -> str:
        """MSH-9.1, e.g. "ADT"."""
        return self.message_type.split(self.component_separator, 1)[0]

    @property
    def trigger_event(self) -> str:
        """MSH-9.2, e.g. "A01"; "" when absent."""
        parts = self.message_type.split(self.component_separator, 2)
        return parts[1] if len(parts) > 1 else ""

    def as_dict(self) -> dict[str, str]:
        """Every attribute, derived ones included (the C twin's HeaderC gives the same dict)."""
        result = {name: getattr(self, name) for name in HEADER_FIELDS}
        result["message_code"] = self.message_code
        result["trigger_event"] = self.trigger_event
        return result


#: The Header fields in declaration order (HeaderC hashes the same tuple).
HEADER_FIELDS: Final[tuple[str, ...]] = tuple(Header.__dataclass_fields__)


def parse_header(message: bytes) -> Header:
    """The MSH of `message` as a Header; Hl7Error if the message has no readable MSH."""
    msh = read_msh(message)
    field = msh.get
    encoding_characters = field(2)
    repetition = encoding_characters[1:2] or "~"
    return Header(
        field_separator=msh.separator,
        encoding_characters=encoding_characters,
        sending_application=field(3),
        sending_facility=field(4),
        receiving_application=field(5),
        receiving_facility=field(6),
        timestamp=field(7),
        message_type=field(9),
        control_id=field(10),
        processing_id=field(11),
        version=field(12),
        accept_ack_type=field(15),
        app_ack_type=field(16),
        charset=field(18).split(repetition, 1)[0],
    )


def ack_message_type(message_type: str, component: str) -> str:
    """ACK MSH-9 from the original MSH-9 (Medplum's rule: mirror the original's shape)."""
    parts = message_type.split(component, 3)
    trigger = parts[1] if len(parts) > 1 else ""
    structure = parts[2] if len(parts) > 2 else ""
    if trigger and structure:
        return f"ACK{component}{trigger}{component}ACK"
    if trigger:
        return f"ACK{component}{trigger}"
    return "ACK"


# ---------------------------------------------------------------------------------------------
# Segments
# ---------------------------------------------------------------------------------------------


def split_segments(message: bytes) -> list[bytes]:
    """The message's segments, without terminators.

    CR, LF and CRLF all end a segment; empty lines, a trailing terminator, a leading BOM and
    leading whitespace are dropped. A UTF-16/32 message is decoded (strictly: Hl7Error if it is
    not valid) and its segments are returned in the same encoding, without a BOM.
    """
    message = as_bytes(message)
    wide, bom_length = sniff_encoding(message)
    if wide is None:
        start = _WHITESPACE_BYTES.match(message, bom_length).end()  # type: ignore[union-attr]
        return _SEGMENT_BYTES.findall(message, start)
    text = _decode_strict(message, bom_length, wide, wide)
    start = _WHITESPACE_TEXT.match(text).end()  # type: ignore[union-attr]
    return [segment.encode(wide) for segment in _SEGMENT_TEXT.findall(text, start)]


# ---------------------------------------------------------------------------------------------
# Character sets (HL7 table 0211)
# ---------------------------------------------------------------------------------------------

_WIDE_CODECS: Final = frozenset({"utf-16", "utf-32"})
_LOOSE_DELETE: Final = str.maketrans("", "", " \t-_/")

_CHARSET_CODECS: Final[dict[str, str]] = {
    "ASCII": "ascii",
    "USASCII": "ascii",
    "ISOIR6": "ascii",
    "UNICODE": "utf-8",
    "UNICODEUTF8": "utf-8",
    "UTF8": "utf-8",
    "ISOIR192": "utf-8",
    "UNICODEUTF16": "utf-16",
    "UTF16": "utf-16",
    "UNICODEUTF32": "utf-32",
    "UTF32": "utf-32",
    "GB18030": "gb18030",
    "GB180302000": "gb18030",
    "KSX1001": "euc_kr",
    "BIG5": "big5",
    "ISOIR14": "iso2022_jp",
    "ISOIR87": "iso2022_jp",
    "ISOIR159": "iso2022_jp_2",
    **{f"{prefix}8859{part}": f"iso8859-{part}"
       for prefix in ("", "ISO") for part in (*range(1, 12), *range(13, 17))},
}
_UNSUPPORTED_CHARSETS: Final = frozenset({"CNS116431992", "CNS11643"})
_JIS_SETS: Final = frozenset({"ISOIR14", "ISOIR87", "ISOIR159"})
_CODE_EXTENSION_BASES: Final = frozenset({None, "ascii", "iso2022_jp"})


def _loose_key(name: str) -> str:
    return name.upper().translate(_LOOSE_DELETE)


@lru_cache(maxsize=128)
def codec_for_charset(name: str) -> str:
    """Python codec for an HL7 table 0211 character set name (MSH-18); Hl7Error if unknown.

    Case, spaces, ``-``, ``_`` and ``/`` are ignored, so "UNICODE UTF-8", "UTF-8", "utf8" and
    "8859/1", "ISO-8859-1" are accepted. See the module docstring for the mapping and choices.
    """
    key = _loose_key(name)
    codec = _CHARSET_CODECS.get(key)
    if codec is not None:
        return codec
    if key in _UNSUPPORTED_CHARSETS:
        raise Hl7Error(
            f"character set {name!r} (MSH-18) is a valid HL7 table 0211 name, but Python has "
            "no codec for it; ask the sender for UNICODE UTF-8 or BIG-5"
        )
    raise Hl7Error(
        f"unknown character set {name!r} in MSH-18; expected an HL7 table 0211 name such as "
        "'UNICODE UTF-8', '8859/1' or 'ASCII'"
    )


@lru_cache(maxsize=256)
def charset_codec(charset_field: str, repetition: str) -> tuple[str | None, str]:
    """(codec or None for "use the default", charset name for messages) from a raw MSH-18."""
    repetitions = charset_field.split(repetition)
    first = repetitions[0]
    codec = codec_for_charset(first) if _loose_key(first) else None
    if codec in _CODE_EXTENSION_BASES:
        for later in repetitions[1:]:
            if _loose_key(later) in _JIS_SETS:
                return "iso2022_jp_2", charset_field
    return codec, first


def text_codec(charset_field: str, repetition: str) -> str:
    """Codec for caller-supplied text in an ASCII-compatible message with this raw MSH-18.

    latin-1 when MSH-18 is empty (the same default as `decode`), ASCII when the charset is
    unknown or not ASCII-compatible (so the ACK stays readable), else the charset's codec.
    """
    if not charset_field:
        return "latin-1"
    try:
        codec, _ = charset_codec(charset_field, repetition)
    except Hl7Error:
        return "ascii"
    if codec is None:
        return "latin-1"
    return "ascii" if codec in _WIDE_CODECS else codec


def _decode_strict(message: bytes, start: int, codec: str, charset: str) -> str:
    try:
        return str(memoryview(message)[start:], codec)
    except UnicodeDecodeError as exc:
        raise Hl7Error(
            f"the message is not valid {charset} text (Python codec {codec}): {exc.reason} "
            f"at byte offset {exc.start + start} of {len(message)}"
        ) from None


def decode_body(message: bytes, charset_field: str, repetition: str, default: str) -> str:
    """Decode an ASCII-compatible message (no BOM) whose raw MSH-18 is `charset_field`."""
    codec, charset = charset_codec(charset_field, repetition)
    if codec is None:
        codec = charset = default
    elif codec in _WIDE_CODECS:
        raise Hl7Error(
            f"MSH-18 declares {charset!r}, but the message is not UTF-16/UTF-32 encoded "
            "(its MSH is plain 8-bit text)"
        )
    return _decode_strict(message, 0, codec, charset)


def decode(message: bytes, default: str = "latin-1") -> str:
    """The message as text, in the character set it declares.

    A BOM (UTF-8, UTF-16 LE/BE, UTF-32 LE/BE) wins and is removed; then UTF-16 detected by its
    bytes; then MSH-18 (see `codec_for_charset`); then `default` (also for a message without a
    readable MSH). Hl7Error for an unknown charset or bytes that do not decode in it.
    """
    message = as_bytes(message)
    wide, bom_length = sniff_encoding(message)
    if wide is not None:
        return _decode_strict(message, bom_length, wide, wide)
    if bom_length:
        return _decode_strict(message, bom_length, "utf-8", "UTF-8 (byte-order mark)")
    try:
        msh = read_msh(message)
    except Hl7Error:
        return decode_body(message, "", "~", default)
    return decode_body(message, msh.get(18), msh.get(2)[1:2] or "~", default)


# ---------------------------------------------------------------------------------------------
# MSH-7 and MSH-10 of the ACK
# ---------------------------------------------------------------------------------------------


def format_timestamp(second: int) -> str:
    """HL7 DTM to the second (YYYYMMDDHHMMSS), local time, as most senders write MSH-7."""
    return time.strftime("%Y%m%d%H%M%S", time.localtime(second))


_timestamp_cache: tuple[int, str] = (-1, "")


def current_timestamp() -> str:
    """`format_timestamp` of now; formatted once per second (the ACK hot path)."""
    global _timestamp_cache
    second = int(time.time())
    cached = _timestamp_cache
    if cached[0] != second:
        cached = (second, format_timestamp(second))
        _timestamp_cache = cached
    return cached[1]


_BASE36: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Counter values stay below this (8 hex digits), so ids stay within 20 characters.
CONTROL_ID_COUNTER_LIMIT: Final = 16**8


def _base36(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 36)
        digits.append(_BASE36[digit])
    return "".join(reversed(digits))


def new_control_id_prefix(not_before: int = 0) -> tuple[str, int]:
    """(11-character prefix from time and pid, the second it encodes), second >= not_before."""
    second = max(int(time.time()), not_before)
    return _base36(second % 36**6, 6) + _base36(os.getpid() % 36**5, 5), second


class ControlIdGenerator:
    """Per-process unique MSH-10 values ``<prefix><tag><hex counter>`` (<= 20 characters)."""

    __slots__ = ("_lock", "_state", "_tag")

    def __init__(self, tag: str) -> None:
        self._tag = tag
        self._lock = threading.Lock()
        self._state: tuple[str, int, itertools.count[int]] = ("", 0, itertools.count(1))
        self.reseed()

    def reseed(self, not_before: int = 0) -> None:
        """Start a new prefix (after fork, or when the counter is exhausted)."""
        prefix, second = new_control_id_prefix(not_before)
        self._state = (prefix + self._tag, second, itertools.count(1))

    def __call__(self) -> str:
        prefix, second, counter = self._state
        number = next(counter)
        if number >= CONTROL_ID_COUNTER_LIMIT:
            with self._lock:
                if self._state[2] is counter:
                    self.reseed(second + 1)
            prefix, second, counter = self._state
            number = next(counter)
        return f"{prefix}{number:X}"


_control_ids: Final = ControlIdGenerator("P")
os.register_at_fork(after_in_child=_control_ids.reseed)


def make_control_id() -> str:
    """A new MSH-10 value, unique within this process (and across processes of one host)."""
    return _control_ids()


# ---------------------------------------------------------------------------------------------
# ACK (ch. 2.9, 2.14.8 MSA, 2.14.5 ERR)
# ---------------------------------------------------------------------------------------------


def ack_code_error(code: object) -> ValueError:
    """The error for an MSA-1 code outside HL7 table 0008 (shared with the Cython twin)."""
    return ValueError(f"acknowledgment code must be one of {', '.join(ACK_CODES)}, not {code!r}")


def build_ack(
    message: bytes,
    code: str = "AA",
    text: str | None = None,
    error: str | None = None,
    *,
    timestamp: str | None = None,
    control_id: str | None = None,
    error_code: str = "207",
) -> bytes:
    """The acknowledgment of `message` (see the module docstring for its exact shape).

    `code` is MSA-1 (AA/AE/AR/CA/CE/CR; anything else is ValueError), `text` MSA-3 (default:
    Medplum's words for the code), `error` adds an ERR segment with `error_code` (table 0357)
    in ERR-3 and `error` in ERR-8. `timestamp` and `control_id` override MSH-7 and MSH-10.
    Hl7Error when the message has no readable MSH.
    """
    default_text = ACK_CODES.get(code)
    if default_text is None:
        raise ack_code_error(code)
    msh = read_msh(message)
    field = msh.get
    encoding_characters = field(2)
    seps = separators(msh.separator, encoding_characters)
    charset_field = field(18)
    codec = None if msh.wide else text_codec(charset_field, seps.repetition)

    def supplied(value: str) -> str:
        return encode_value(value, seps, codec)

    header = [
        "MSH",
        encoding_characters,
        field(5),
        field(6),
        field(3),
        field(4),
        current_timestamp() if timestamp is None else supplied(timestamp),
        "",
        ack_message_type(field(9), seps.component),
        make_control_id() if control_id is None else supplied(control_id),
        field(11) or DEFAULT_PROCESSING_ID,
        field(12) or DEFAULT_VERSION,
    ]
    if charset_field:
        header += ["", "", "", "", "", charset_field]
    segments = [
        seps.field.join(header),
        seps.field.join(("MSA", code, field(10), supplied(default_text if text is None else text))),
    ]
    if error is not None:
        error_type = seps.component.join(
            (supplied(error_code), supplied(ERROR_CODE_TEXT.get(error_code, "")), ERROR_TABLE_NAME)
        )
        segments.append(
            seps.field.join(("ERR", "", "", error_type, ERROR_SEVERITY, "", "", "", supplied(error)))
        )
    ack = SEGMENT_TERMINATOR.join(segments) + SEGMENT_TERMINATOR
    return encode_wide(ack, msh.wide) if msh.wide else ack.encode("latin-1")


# ---------------------------------------------------------------------------------------------
# Reading an ACK (ch. 2.14.8 MSA)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AckInfo:
    """The MSA segment of an acknowledgment (raw values; "" when absent)."""

    code: str  # MSA-1, as sent (e.g. "AA"; compare after .strip().upper())
    control_id: str  # MSA-2: the MSH-10 of the message it acknowledges
    text: str  # MSA-3


def _ack_text(message: bytes | bytearray | memoryview | str) -> str:
    """`message` as text for MSA reading: wide input decoded, other bytes as latin-1."""
    if isinstance(message, str):
        return message[1:] if message[:1] == "\ufeff" else message
    message = as_bytes(message)
    wide, bom_length = sniff_encoding(message)
    if wide is None:
        return message[bom_length:].decode("latin-1")
    return message[bom_length:].decode(wide, "replace")


def parse_ack(message: bytes | bytearray | memoryview | str) -> AckInfo | None:
    """The first MSA of `message` (see the module docstring); None without one.

    Hl7Error when the message has no readable MSH (it is not HL7 v2).
    """
    text = _ack_text(message)
    begin, end = _first_line(text, 0, _WHITESPACE_TEXT, "\r", "\n")
    if end - begin < 4 or not text.startswith("MSH", begin) or not is_field_separator(text[begin + 3]):
        raise no_msh_error(len(message))
    separator = text[begin + 3]
    marker = "MSA" + separator
    position = text.find(marker, end)
    while position >= 0 and text[position - 1] not in "\r\n":
        position = text.find(marker, position + 4)
    if position < 0:
        return None
    stop = len(text)
    for terminator in ("\r", "\n"):
        found = text.find(terminator, position, stop)
        if found >= 0:
            stop = found
    fields = text[position + 4 : stop].split(separator, 3)
    fields += [""] * (3 - len(fields))
    text_field = fields[2]
    return AckInfo(fields[0], fields[1], text_field)
