# cython: language_level=3, embedsignature=True, annotation_typing=False
"""HL7 v2 header scan, segment split and ACK templating: Cython twin of `medagent.proto._hl7_py`.

Standard: HL7 v2.x chapter 2 (message construction rules 2.5-2.7, acknowledgment 2.9, MSH
2.14.9, MSA 2.14.8, ERR 2.14.5). The pure twin is the specification, including every rule for
finding the MSH, separators, escaping, charsets and the ACK layout; read its docstring. Never
import this module directly; use `medagent.proto.hl7`, which selects it through
`medagent._compat.load_fast("_hl7")`.

Theory of operation: `scan_msh` runs once over the input's buffer (bytes directly; bytearray
and memoryview are copied to bytes first) with no Python work per byte: it checks the BOM and
the UTF-16 NUL pattern, skips leading whitespace, checks ``MSH`` + field separator, then walks
the MSH segment once, recording the start/stop offsets of MSH-2..MSH-18 and stopping at the
field separator after MSH-18 or at the first CR/LF. `HeaderC` keeps the message and these
offsets and decodes a field (latin-1) only when it is read. `build_ack` lays the ACK out as a
list of (pointer, length) pieces - raw fields point into the message, constants into static
strings, MSH-7 into a per-second cached bytes, MSH-10 into a stack buffer from a C counter -
and copies them into one preallocated bytes object. Segment splitting uses `memchr`, keeping the
next CR and next LF positions so that the scan stays linear for any terminator mix. `decode`
reads MSH-18 with the same scan and caches the codec per raw MSH-18 value (bounded dict).
`parse_ack` reads text (a bot's reply, once per message in original and two-phase mode) with
`str` scans and no per-character Python work; bytes go to the pure twin.

Invariants: results are byte-identical to the pure twin for the same input (differential tests).
Whatever is not the hot path is delegated to the pure twin so that it cannot drift: wide
(UTF-16/32) messages, caller text that needs escaping or is not plain ASCII, charset lookup,
error construction. Caller values take the fast path only when they are ASCII and contain no
delimiter, CR or LF, in which case escaping and charset encoding are the identity. MSH-10 values
generated here carry the tag ``C`` (the pure generator's is ``P``), so the two generators of one
process never collide. The GIL is held throughout (the work per call is well under a
microsecond); `scan_msh` and the piece copy are ``nogil``-clean for later use.
"""

cimport cython

from medagent._fast._scan cimport find_byte
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.string cimport memchr, memcpy
from libc.time cimport time as c_time, time_t

import os

from medagent.proto import _hl7_py as _py
from medagent.proto._hl7_py import ACK_CODES, ERROR_CODE_TEXT, HEADER_FIELDS, AckInfo, Header, Hl7Error

__all__ = ["Hl7Error", "HeaderC", "parse_header", "split_segments", "decode", "build_ack",
           "make_control_id", "parse_ack"]

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object)
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL

cdef enum:
    CR = 0x0D
    LF = 0x0A
    LAST_FIELD = 18          # MSH-18 is the last field read
    MAX_PIECES = 64          # pieces of the longest ACK (with MSH-18 and ERR) are < 64
    CONTROL_ID_CAPACITY = 32

cdef enum ScanResult:
    SCAN_OK = 0
    SCAN_WIDE = 1            # UTF-16/32: the pure twin handles it
    SCAN_NO_MSH = 2

cdef struct Msh:
    Py_ssize_t begin                     # offset of "MSH"
    Py_ssize_t start[LAST_FIELD + 1]     # MSH-n is buffer[start[n]:stop[n]] for 2 <= n <= 18
    Py_ssize_t stop[LAST_FIELD + 1]      # (start == stop == 0 when absent)
    unsigned char field_sep
    unsigned char component
    unsigned char repetition
    unsigned char escape
    unsigned char subcomponent
    int truncation                       # -1 when MSH-2 has no fifth character

cdef struct Piece:
    const char* data
    Py_ssize_t size

cdef const char* S_MSH = b"MSH"
cdef const char* S_MSA = b"MSA"
cdef const char* S_ERR = b"ERR"
cdef const char* S_ACK = b"ACK"
cdef const char* S_TERMINATOR = b"\r"
cdef const char* S_TABLE = b"HL70357"
cdef const char* S_SEVERITY = b"E"
cdef const char* S_PROCESSING = b"P"
cdef const char* S_VERSION = b"2.5.1"
cdef const char* HEX_DIGITS = b"0123456789ABCDEF"

assert _py.DEFAULT_PROCESSING_ID == "P" and _py.DEFAULT_VERSION == "2.5.1"
assert _py.ERROR_TABLE_NAME == "HL70357" and _py.ERROR_SEVERITY == "E"

#: code -> (code, default MSA-3 text), both str
cdef dict ACK_TABLE = {code: (code, text) for code, text in ACK_CODES.items()}


# ----------------------------------------------------------------------------------------------
# Scanning
# ----------------------------------------------------------------------------------------------



cdef inline Py_ssize_t sniff(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Length of a UTF-8 BOM (0 or 3), or -1 for a wide message (same rules as sniff_encoding)."""
    if n >= 3 and p[0] == 0xEF and p[1] == 0xBB and p[2] == 0xBF:
        return 3
    if n >= 2 and ((p[0] == 0xFF and p[1] == 0xFE) or (p[0] == 0xFE and p[1] == 0xFF)):
        return -1
    if n >= 4 and p[0] == 0 and p[1] == 0 and p[2] == 0xFE and p[3] == 0xFF:
        return -1
    if n >= 2 and ((p[0] != 0) != (p[1] != 0)):
        return -1
    return 0


cdef inline bint is_leading_space(Py_UCS4 c) noexcept nogil:
    """Space, TAB, LF, VT, FF or CR: what may precede the MSH."""
    return c == 0x20 or (c >= 0x09 and c <= 0x0D)


cdef inline Py_ssize_t skip_whitespace(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """First index >= i that is not space, TAB, LF, VT, FF or CR."""
    while i < n and is_leading_space(p[i]):
        i += 1
    return i


cdef inline bint is_field_separator(unsigned char c) noexcept nogil:
    """ASCII punctuation (0x21..0x7E, not a letter or digit), like _hl7_py.is_field_separator."""
    if c < 0x21 or c > 0x7E:
        return False
    if (c >= 0x30 and c <= 0x39) or (c >= 0x41 and c <= 0x5A) or (c >= 0x61 and c <= 0x7A):
        return False
    return True


@cython.boundscheck(False)
@cython.wraparound(False)
cdef ScanResult scan_msh(const unsigned char* p, Py_ssize_t n, Msh* m) noexcept nogil:
    """Locate MSH-2..MSH-18 in p[0:n]. Reads only p[0:n]: every index is checked against n."""
    cdef Py_ssize_t i = sniff(p, n)
    cdef Py_ssize_t j, field_start, length
    cdef int number
    cdef unsigned char c, field_sep
    if i < 0:
        return SCAN_WIDE
    i = skip_whitespace(p, i, n)
    if n - i < 4 or p[i] != b'M' or p[i + 1] != b'S' or p[i + 2] != b'H':
        return SCAN_NO_MSH
    field_sep = p[i + 3]
    if not is_field_separator(field_sep):
        return SCAN_NO_MSH
    m.begin = i
    m.field_sep = field_sep
    number = 2
    field_start = i + 4
    j = field_start
    while True:
        if j >= n:
            m.start[number] = field_start
            m.stop[number] = j
            break
        c = p[j]
        if c == field_sep:
            m.start[number] = field_start
            m.stop[number] = j
            if number == LAST_FIELD:
                break
            number += 1
            field_start = j + 1
        elif c == CR or c == LF:
            m.start[number] = field_start
            m.stop[number] = j
            break
        j += 1
    for number in range(number + 1, LAST_FIELD + 1):  # absent fields are empty
        m.start[number] = 0
        m.stop[number] = 0
    # MSH-2 with standard defaults for missing positions (_hl7_py.separators)
    length = m.stop[2] - m.start[2]
    field_start = m.start[2]
    m.component = p[field_start] if length >= 1 else b'^'
    m.repetition = p[field_start + 1] if length >= 2 else b'~'
    m.escape = p[field_start + 2] if length >= 3 else b'\\'
    m.subcomponent = p[field_start + 3] if length >= 4 else b'&'
    m.truncation = p[field_start + 4] if length >= 5 else -1
    return SCAN_OK


cdef inline bytes as_bytes(object message):
    if PyBytes_CheckExact(message):
        return <bytes>message
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message)
    raise TypeError(f"an HL7 message must be bytes, not {type(message).__name__}")


cdef inline str latin1(bytes message, Py_ssize_t start, Py_ssize_t stop):
    return PyUnicode_DecodeLatin1(PyBytes_AS_STRING(message) + start, stop - start, NULL)


# ----------------------------------------------------------------------------------------------
# Header
# ----------------------------------------------------------------------------------------------

@cython.final
cdef class HeaderC:
    """The MSH fields of a message, decoded lazily from offsets into it.

    Same attributes, `as_dict()`, equality and hash as `medagent.proto.hl7.Header` (the pure
    twin's dataclass; a HeaderC equals the Header with the same values). Pickles as a Header.
    Keeps a reference to the message it was parsed from.
    """

    cdef bytes _message
    cdef Msh _m

    def __init__(self) -> None:
        raise TypeError("HeaderC is created by parse_header(); build a Header to make one by hand")

    cdef inline str _field(self, int number):
        return latin1(self._message, self._m.start[number], self._m.stop[number])

    cdef Py_ssize_t _component_stop(self, Py_ssize_t start, Py_ssize_t stop):
        cdef Py_ssize_t hit = find_byte(<const unsigned char*>PyBytes_AS_STRING(self._message),
                                        start, stop, self._m.component)
        return stop if hit < 0 else hit

    @property
    def field_separator(self) -> str:
        return latin1(self._message, self._m.begin + 3, self._m.begin + 4)

    @property
    def encoding_characters(self) -> str:
        return self._field(2)

    @property
    def sending_application(self) -> str:
        return self._field(3)

    @property
    def sending_facility(self) -> str:
        return self._field(4)

    @property
    def receiving_application(self) -> str:
        return self._field(5)

    @property
    def receiving_facility(self) -> str:
        return self._field(6)

    @property
    def timestamp(self) -> str:
        return self._field(7)

    @property
    def message_type(self) -> str:
        return self._field(9)

    @property
    def control_id(self) -> str:
        return self._field(10)

    @property
    def processing_id(self) -> str:
        return self._field(11)

    @property
    def version(self) -> str:
        return self._field(12)

    @property
    def accept_ack_type(self) -> str:
        return self._field(15)

    @property
    def app_ack_type(self) -> str:
        return self._field(16)

    @property
    def charset(self) -> str:
        cdef Py_ssize_t start = self._m.start[18], stop = self._m.stop[18]
        cdef Py_ssize_t hit = find_byte(<const unsigned char*>PyBytes_AS_STRING(self._message),
                                        start, stop, self._m.repetition)
        return latin1(self._message, start, stop if hit < 0 else hit)

    @property
    def component_separator(self) -> str:
        return chr(self._m.component)

    @property
    def message_code(self) -> str:
        cdef Py_ssize_t start = self._m.start[9]
        return latin1(self._message, start, self._component_stop(start, self._m.stop[9]))

    @property
    def trigger_event(self) -> str:
        cdef Py_ssize_t start = self._m.start[9], stop = self._m.stop[9]
        cdef Py_ssize_t first = self._component_stop(start, stop)
        if first == stop:
            return ""
        return latin1(self._message, first + 1, self._component_stop(first + 1, stop))

    def as_dict(self) -> dict:
        """Every attribute, derived ones included (equal to Header.as_dict for equal headers)."""
        result = {name: getattr(self, name) for name in HEADER_FIELDS}
        result["message_code"] = self.message_code
        result["trigger_event"] = self.trigger_event
        return result

    def _values(self) -> tuple:
        return tuple([getattr(self, name) for name in HEADER_FIELDS])

    def __eq__(self, other):
        if isinstance(other, (HeaderC, Header)):
            return self.as_dict() == other.as_dict()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in HEADER_FIELDS)
        return f"HeaderC({fields})"

    def __reduce__(self):
        return (Header, self._values())


def parse_header(message: bytes) -> HeaderC | Header:
    """The MSH of `message`; Hl7Error if none is readable. UTF-16/32 messages get a Header."""
    cdef bytes data = as_bytes(message)
    cdef HeaderC header
    cdef Msh m
    cdef ScanResult result = scan_msh(<const unsigned char*>PyBytes_AS_STRING(data),
                                      PyBytes_GET_SIZE(data), &m)
    if result == SCAN_OK:
        header = HeaderC.__new__(HeaderC)
        header._message = data
        header._m = m
        return header
    if result == SCAN_WIDE:
        return _py.parse_header(data)
    raise _py.no_msh_error(PyBytes_GET_SIZE(data))


# ----------------------------------------------------------------------------------------------
# Segments and decoding
# ----------------------------------------------------------------------------------------------

@cython.boundscheck(False)
@cython.wraparound(False)
def split_segments(message: bytes) -> list:
    """Segments without terminators (CR, LF or CRLF; empty lines dropped), as the pure twin."""
    cdef bytes data = as_bytes(message)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i = sniff(p, n)
    cdef Py_ssize_t next_cr = -1, next_lf = -1, end
    cdef list segments = []
    if i < 0:
        return _py.split_segments(data)
    i = skip_whitespace(p, i, n)
    while i < n:
        if p[i] == CR or p[i] == LF:
            i += 1
            continue
        if next_cr < i:
            next_cr = find_byte(p, i, n, CR)
            if next_cr < 0:
                next_cr = n
        if next_lf < i:
            next_lf = find_byte(p, i, n, LF)
            if next_lf < 0:
                next_lf = n
        end = next_cr if next_cr < next_lf else next_lf
        segments.append(PyBytes_FromStringAndSize(<const char*>p + i, end - i))
        i = end
    return segments


def decode(message: bytes, default: str = "latin-1") -> str:
    """The message as text in its declared charset; same rules and errors as the pure twin."""
    cdef bytes data = as_bytes(message)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Msh m
    cdef ScanResult result
    if sniff(p, n) != 0:
        return _py.decode(data, default)
    result = scan_msh(p, n, &m)
    if result == SCAN_NO_MSH:
        return _py.decode_body(data, "", "~", default)
    if m.stop[18] == m.start[18]:  # no MSH-18: the default codec
        if default == "latin-1":
            return PyUnicode_DecodeLatin1(<const char*>p, n, NULL)
        codec = default
    else:
        charset_field = latin1(data, m.start[18], m.stop[18])
        codec = DECODE_CODECS.get((charset_field, m.repetition))
        if codec is None:
            codec = cached_decode_codec(charset_field, m.repetition)
    if codec is not WIDE_OR_UNKNOWN:
        try:
            return data.decode(codec)
        except UnicodeDecodeError:
            pass
    # errors (and their exact messages) come from the pure twin
    return _py.decode_body(data, latin1(data, m.start[18], m.stop[18]), chr(m.repetition), default)


cdef object WIDE_OR_UNKNOWN = object()
cdef dict DECODE_CODECS = {}


cdef object cached_decode_codec(str charset_field, unsigned char repetition):
    """Codec for a non-empty raw MSH-18, or WIDE_OR_UNKNOWN when decode_body must raise."""
    try:
        codec, _ = _py.charset_codec(charset_field, chr(repetition))
    except Hl7Error:
        codec = WIDE_OR_UNKNOWN
    if codec is None or codec in ("utf-16", "utf-32"):
        codec = WIDE_OR_UNKNOWN  # None (only repetition separators): rare, let the pure twin decide
    if len(DECODE_CODECS) >= 256:
        DECODE_CODECS.clear()
    DECODE_CODECS[(charset_field, repetition)] = codec
    return codec


# ----------------------------------------------------------------------------------------------
# MSH-7 and MSH-10 of the ACK
# ----------------------------------------------------------------------------------------------

cdef time_t timestamp_second = -1
cdef bytes timestamp_bytes = b""


cdef bytes current_timestamp():
    """Now as YYYYMMDDHHMMSS (formatted by the pure twin once per second)."""
    global timestamp_second, timestamp_bytes
    cdef time_t now = c_time(NULL)
    if now != timestamp_second:
        timestamp_bytes = _py.format_timestamp(now).encode("ascii")
        timestamp_second = now
    return timestamp_bytes


cdef char control_id_prefix[CONTROL_ID_CAPACITY]
cdef Py_ssize_t control_id_prefix_size = 0
cdef unsigned long long control_id_counter = 0
cdef long long control_id_second = 0
cdef unsigned long long CONTROL_ID_LIMIT = _py.CONTROL_ID_COUNTER_LIMIT


cdef int reseed_control_ids(long long not_before) except -1:
    global control_id_prefix_size, control_id_counter, control_id_second
    prefix, second = _py.new_control_id_prefix(not_before)
    cdef bytes encoded = (prefix + "C").encode("ascii")
    if len(encoded) > CONTROL_ID_CAPACITY - 16:
        raise RuntimeError("control id prefix too long")
    memcpy(control_id_prefix, PyBytes_AS_STRING(encoded), len(encoded))
    control_id_prefix_size = len(encoded)
    control_id_counter = 0
    control_id_second = second
    return 0


cdef Py_ssize_t next_control_id(char* out) except -1:
    """Write the next id (prefix, tag C, upper-case hex counter) to out; return its length."""
    global control_id_counter
    cdef char digits[16]
    cdef int count = 0, i
    cdef unsigned long long number
    control_id_counter += 1
    if control_id_counter >= CONTROL_ID_LIMIT:
        reseed_control_ids(control_id_second + 1)
        control_id_counter = 1
    number = control_id_counter
    while True:
        digits[count] = HEX_DIGITS[number & 0xF]
        count += 1
        number >>= 4
        if number == 0:
            break
    memcpy(out, control_id_prefix, control_id_prefix_size)
    for i in range(count):
        out[control_id_prefix_size + i] = digits[count - 1 - i]
    return control_id_prefix_size + count


def _reseed_after_fork() -> None:
    reseed_control_ids(0)


reseed_control_ids(0)
os.register_at_fork(after_in_child=_reseed_after_fork)


def make_control_id() -> str:
    """A new MSH-10 value, unique within this process (tag C; see the pure twin)."""
    cdef char buffer[CONTROL_ID_CAPACITY]
    cdef Py_ssize_t size = next_control_id(buffer)
    return PyUnicode_DecodeLatin1(buffer, size, NULL)


# ----------------------------------------------------------------------------------------------
# ACK
# ----------------------------------------------------------------------------------------------

cdef inline bint is_plain(const char* s, Py_ssize_t size, const Msh* m) noexcept nogil:
    """True when s has no delimiter, CR or LF: escaping it is the identity."""
    cdef Py_ssize_t k
    cdef int c
    for k in range(size):
        c = <unsigned char>s[k]
        if (c == m.field_sep or c == m.component or c == m.repetition or c == m.escape
                or c == m.subcomponent or c == m.truncation or c == CR or c == LF):
            return False
    return True


cdef object supplied(object value, bytes message, const Msh* m, Piece* piece):
    """Point `piece` at `value` ready for the ACK; return the object that owns those bytes.

    Fast path: an ASCII str without delimiters is used as it is (escaping and any ASCII-
    compatible charset leave it unchanged). Anything else goes through the pure twin's
    encode_value, so the result is the same by construction.
    """
    cdef Py_ssize_t size
    cdef const char* data
    cdef bytes encoded
    if isinstance(value, str) and PyUnicode_IS_ASCII(value):
        data = PyUnicode_AsUTF8AndSize(value, &size)
        if is_plain(data, size, m):
            piece.data = data
            piece.size = size
            return value
    encoding_characters = latin1(message, m.start[2], m.stop[2])
    seps = _py.separators(chr(m.field_sep), encoding_characters)
    codec = _py.text_codec(latin1(message, m.start[18], m.stop[18]), seps.repetition)
    encoded = _py.encode_value(value, seps, codec).encode("latin-1")
    piece.data = PyBytes_AS_STRING(encoded)
    piece.size = PyBytes_GET_SIZE(encoded)
    return encoded


cdef inline int put(Piece* pieces, int count, const char* data, Py_ssize_t size) noexcept nogil:
    pieces[count].data = data
    pieces[count].size = size
    return count + 1


cdef inline int put_field(Piece* pieces, int count, const char* base, const Msh* m,
                          int number) noexcept nogil:
    return put(pieces, count, base + m.start[number], m.stop[number] - m.start[number])


cdef inline int put_field_or(Piece* pieces, int count, const char* base, const Msh* m,
                             int number, const char* fallback, Py_ssize_t fallback_size) noexcept nogil:
    if m.stop[number] > m.start[number]:
        return put_field(pieces, count, base, m, number)
    return put(pieces, count, fallback, fallback_size)


cdef int put_ack_type(Piece* pieces, int count, const char* base, const Msh* m) noexcept nogil:
    """ACK MSH-9 (_hl7_py.ack_message_type): mirror trigger event and message structure."""
    cdef const unsigned char* p = <const unsigned char*>base
    cdef Py_ssize_t start = m.start[9], stop = m.stop[9]
    cdef Py_ssize_t first, second, third
    cdef Py_ssize_t trigger_start = 0, trigger_stop = 0, structure_start = 0, structure_stop = 0
    first = find_byte(p, start, stop, m.component)
    if first >= 0:
        trigger_start = first + 1
        second = find_byte(p, trigger_start, stop, m.component)
        trigger_stop = stop if second < 0 else second
        if second >= 0:
            structure_start = second + 1
            third = find_byte(p, structure_start, stop, m.component)
            structure_stop = stop if third < 0 else third
    count = put(pieces, count, S_ACK, 3)
    if trigger_stop > trigger_start:
        count = put(pieces, count, <const char*>&m.component, 1)
        count = put(pieces, count, base + trigger_start, trigger_stop - trigger_start)
        if structure_stop > structure_start:
            count = put(pieces, count, <const char*>&m.component, 1)
            count = put(pieces, count, S_ACK, 3)
    return count


cdef bytes join_pieces(const Piece* pieces, int count):
    cdef Py_ssize_t total = 0, size, j
    cdef int k
    cdef char* out
    for k in range(count):
        total += pieces[k].size
    result = PyBytes_FromStringAndSize(NULL, total)
    out = PyBytes_AS_STRING(result)
    for k in range(count):
        size = pieces[k].size
        if size <= 8:  # most pieces are separators and short fields: skip the memcpy call
            for j in range(size):
                out[j] = pieces[k].data[j]
        else:
            memcpy(out, pieces[k].data, size)
        out += size
    return result


def build_ack(message: bytes, code: str = "AA", text: str | None = None,
              error: str | None = None, *, timestamp: str | None = None,
              control_id: str | None = None, error_code: str = "207") -> bytes:
    """The ACK of `message`; byte-identical to the pure twin (see its docstring)."""
    cdef bytes data
    cdef const char* base
    cdef Msh m
    cdef ScanResult result
    cdef Piece pieces[MAX_PIECES]
    cdef Piece text_piece, ts_piece, id_piece, error_piece, code_piece, short_piece
    cdef char id_buffer[CONTROL_ID_CAPACITY]
    cdef int count = 0, k
    cdef const char* fs
    cdef const char* comp
    entry = ACK_TABLE.get(code)
    if entry is None:
        raise _py.ack_code_error(code)
    data = as_bytes(message)
    base = PyBytes_AS_STRING(data)
    result = scan_msh(<const unsigned char*>base, PyBytes_GET_SIZE(data), &m)
    if result == SCAN_NO_MSH:
        raise _py.no_msh_error(PyBytes_GET_SIZE(data))
    if result == SCAN_WIDE:
        if timestamp is None:
            timestamp = current_timestamp().decode("ascii")
        if control_id is None:
            control_id = make_control_id()
        return _py.build_ack(data, code, text, error, timestamp=timestamp,
                             control_id=control_id, error_code=error_code)

    # the objects owning the bytes that pieces point to stay referenced until the join
    if timestamp is None:
        ts_owner = current_timestamp()
        ts_piece.data = PyBytes_AS_STRING(ts_owner)
        ts_piece.size = PyBytes_GET_SIZE(ts_owner)
    else:
        ts_owner = supplied(timestamp, data, &m, &ts_piece)
    if control_id is None:
        id_piece.data = id_buffer
        id_piece.size = next_control_id(id_buffer)
    else:
        id_owner = supplied(control_id, data, &m, &id_piece)
    text_owner = supplied((<tuple>entry)[1] if text is None else text, data, &m, &text_piece)
    if error is not None:
        error_owner = supplied(error, data, &m, &error_piece)
        code_owner = supplied(error_code, data, &m, &code_piece)
        short_owner = supplied(ERROR_CODE_TEXT.get(error_code, ""), data, &m, &short_piece)
    code_owner_ack = (<tuple>entry)[0]

    fs = <const char*>&m.field_sep
    comp = <const char*>&m.component
    # MSH|<MSH-2>|<MSH-5>|<MSH-6>|<MSH-3>|<MSH-4>|<ts>||<type>|<id>|<MSH-11 or P>|<MSH-12 or 2.5.1>
    count = put(pieces, count, S_MSH, 3)
    count = put(pieces, count, fs, 1)
    count = put_field(pieces, count, base, &m, 2)
    count = put(pieces, count, fs, 1)
    count = put_field(pieces, count, base, &m, 5)
    count = put(pieces, count, fs, 1)
    count = put_field(pieces, count, base, &m, 6)
    count = put(pieces, count, fs, 1)
    count = put_field(pieces, count, base, &m, 3)
    count = put(pieces, count, fs, 1)
    count = put_field(pieces, count, base, &m, 4)
    count = put(pieces, count, fs, 1)
    count = put(pieces, count, ts_piece.data, ts_piece.size)
    count = put(pieces, count, fs, 1)
    count = put(pieces, count, fs, 1)
    count = put_ack_type(pieces, count, base, &m)
    count = put(pieces, count, fs, 1)
    count = put(pieces, count, id_piece.data, id_piece.size)
    count = put(pieces, count, fs, 1)
    count = put_field_or(pieces, count, base, &m, 11, S_PROCESSING, 1)
    count = put(pieces, count, fs, 1)
    count = put_field_or(pieces, count, base, &m, 12, S_VERSION, 5)
    if m.stop[18] > m.start[18]:
        for k in range(6):
            count = put(pieces, count, fs, 1)
        count = put_field(pieces, count, base, &m, 18)
    count = put(pieces, count, S_TERMINATOR, 1)
    # MSA|<code>|<MSH-10>|<text>
    count = put(pieces, count, S_MSA, 3)
    count = put(pieces, count, fs, 1)
    count = put(pieces, count, PyUnicode_AsUTF8AndSize(code_owner_ack, NULL), 2)
    count = put(pieces, count, fs, 1)
    count = put_field(pieces, count, base, &m, 10)
    count = put(pieces, count, fs, 1)
    count = put(pieces, count, text_piece.data, text_piece.size)
    count = put(pieces, count, S_TERMINATOR, 1)
    # ERR|||<code>^<table 0357 text>^HL70357|E||||<error>
    if error is not None:
        count = put(pieces, count, S_ERR, 3)
        count = put(pieces, count, fs, 1)
        count = put(pieces, count, fs, 1)
        count = put(pieces, count, fs, 1)
        count = put(pieces, count, code_piece.data, code_piece.size)
        count = put(pieces, count, comp, 1)
        count = put(pieces, count, short_piece.data, short_piece.size)
        count = put(pieces, count, comp, 1)
        count = put(pieces, count, S_TABLE, 7)
        count = put(pieces, count, fs, 1)
        count = put(pieces, count, S_SEVERITY, 1)
        for k in range(4):
            count = put(pieces, count, fs, 1)
        count = put(pieces, count, error_piece.data, error_piece.size)
        count = put(pieces, count, S_TERMINATOR, 1)
    return join_pieces(pieces, count)


# ----------------------------------------------------------------------------------------------
# Reading an ACK (ch. 2.14.8 MSA)
# ----------------------------------------------------------------------------------------------

cdef inline Py_ssize_t _line_end(str text, Py_ssize_t start, Py_ssize_t size):
    """Where the line starting at `start` ends: its first CR or LF, else `size`."""
    cdef Py_ssize_t end = text.find("\r", start)
    if end < 0:
        end = size
    cdef Py_ssize_t found = text.find("\n", start, end)
    return found if found >= 0 else end


def parse_ack(message):
    """The first MSA of `message` (`_hl7_py.parse_ack`); None without one.

    Text - every bot reply the agent routes, once per message in original and two-phase mode -
    is read here without the pure twin's regex, tuples and calls; bytes (an MLLP client's
    ACKs, possibly wide) go to the pure twin.
    """
    if type(message) is not str:
        return _py.parse_ack(message)
    cdef str text = <str>message
    cdef Py_ssize_t size = len(text)
    cdef Py_ssize_t begin = 1 if size and text[0] == 0xFEFF else 0
    cdef Py_ssize_t end, position, stop
    cdef Py_UCS4 previous
    while begin < size and is_leading_space(text[begin]):
        begin += 1
    end = _line_end(text, begin, size)
    if (end - begin < 4 or text[begin] != u"M" or text[begin + 1] != u"S" or text[begin + 2] != u"H"
            or text[begin + 3] > 0x7E or not is_field_separator(<unsigned char>text[begin + 3])):
        raise _py.no_msh_error(size)
    separator = text[begin + 3]
    marker = "MSA" + separator
    position = text.find(marker, end)
    while position >= 0:
        previous = text[position - 1]
        if previous == 0x0D or previous == 0x0A:
            break
        position = text.find(marker, position + 4)
    if position < 0:
        return None
    stop = _line_end(text, position, size)
    fields = text[position + 4 : stop].split(separator, 3)
    if len(fields) >= 3:
        return _ack_info(fields[0], fields[1], fields[2])
    return _ack_info(fields[0], fields[1] if len(fields) == 2 else "", "")


cdef object _new_object = object.__new__
cdef object _set_slot = object.__setattr__


cdef inline object _ack_info(str code, str control_id, str text):
    """AckInfo(code, control_id, text) without its generated __init__: for a frozen dataclass
    that is three Python-level object.__setattr__ calls (~1 us, most of this function's time)."""
    info = _new_object(AckInfo)
    _set_slot(info, "code", code)
    _set_slot(info, "control_id", control_id)
    _set_slot(info, "text", text)
    return info
