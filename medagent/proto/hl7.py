"""HL7 v2 message header, segments, character sets and acknowledgments (HL7 v2.x chapter 2).

This selector module is the only one users import. What it does, in one line each:

* `parse_header(message) -> Header` - MSH-1..MSH-18 fields an engine routes and ACKs by.
* `split_segments(message) -> list[bytes]` - segments; CR, LF and CRLF all terminate one.
* `decode(message, default="latin-1") -> str` - text in the charset of the BOM or MSH-18.
* `codec_for_charset(name) -> str` - Python codec for an HL7 table 0211 name.
* `build_ack(message, code="AA", text=None, error=None, *, timestamp=None, control_id=None,
  error_code="207") -> bytes` - the MSH/MSA[/ERR] acknowledgment, in the message's encoding.
* `parse_ack(message) -> AckInfo | None` - MSA-1/2/3 of an acknowledgment (bytes or text); the
  one MSA parser of the package. It reads every bot reply in original and two-phase mode (once
  per message), so text has a Cython twin; the twin hands bytes to the pure one.
* `make_control_id() -> str` - a new MSH-10, unique in this process (<= 20 characters).
* `Hl7Error(ValueError)` - no readable MSH, unknown charset, undecodable text.

Typical use in a channel adapter (bytes from the MLLP decoder)::

    try:
        header = parse_header(frame)
    except Hl7Error:
        log.warning("frame without a readable MSH (%d bytes)", len(frame))  # no ACK possible
        return
    ...store...
    send(build_ack(frame, "AA"))           # or "CA" in two-phase mode, "AE"/"CE" + error=...

Every rule (finding the MSH, separators, escaping, the charset table, the ACK layout, control
ids) is specified in `medagent.proto._hl7_py`, the pure-Python twin. `medagent._fast._hl7` is
the Cython twin; it gives byte-identical results. For each kernel this module exports
``<name>Py`` (pure), ``<name>C`` (Cython, None in pure mode) and ``<name>`` (whichever
`medagent._compat` selected). `Header` is the pure twin's frozen dataclass; the Cython
`parse_header` returns a `HeaderC`, which has the same attributes, `as_dict()`, equality and
hash, decodes its fields lazily and keeps a reference to the message (for UTF-16/32 input it
returns a `Header`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medagent._compat import load_fast
from medagent.proto import _hl7_py
from medagent.proto._hl7_py import (
    ACK_CODES,
    DEFAULT_PROCESSING_ID,
    DEFAULT_VERSION,
    ERROR_CODE_TEXT,
    AckInfo,
    Header,
    Hl7Error,
    codec_for_charset,
)

__all__ = [
    "ACK_CODES",
    "DEFAULT_PROCESSING_ID",
    "DEFAULT_VERSION",
    "ERROR_CODE_TEXT",
    "AckInfo",
    "Header",
    "HeaderC",
    "HeaderPy",
    "Hl7Error",
    "build_ack",
    "build_ackC",
    "build_ackPy",
    "codec_for_charset",
    "decode",
    "decodeC",
    "decodePy",
    "make_control_id",
    "make_control_idC",
    "make_control_idPy",
    "parse_ack",
    "parse_ackC",
    "parse_ackPy",
    "parse_header",
    "parse_headerC",
    "parse_headerPy",
    "split_segments",
    "split_segmentsC",
    "split_segmentsPy",
]

if TYPE_CHECKING:
    from medagent._fast._hl7 import HeaderC as _HeaderCType

_fast = load_fast("_hl7")

HeaderPy = Header
HeaderC: type[_HeaderCType] | None = _fast.HeaderC if _fast is not None else None

parse_headerPy = _hl7_py.parse_header
split_segmentsPy = _hl7_py.split_segments
decodePy = _hl7_py.decode
build_ackPy = _hl7_py.build_ack
make_control_idPy = _hl7_py.make_control_id

parse_headerC = _fast.parse_header if _fast is not None else None
split_segmentsC = _fast.split_segments if _fast is not None else None
decodeC = _fast.decode if _fast is not None else None
build_ackC = _fast.build_ack if _fast is not None else None
make_control_idC = _fast.make_control_id if _fast is not None else None

parse_header = _fast.parse_header if _fast is not None else _hl7_py.parse_header
split_segments = _fast.split_segments if _fast is not None else _hl7_py.split_segments
decode = _fast.decode if _fast is not None else _hl7_py.decode
build_ack = _fast.build_ack if _fast is not None else _hl7_py.build_ack
make_control_id = _fast.make_control_id if _fast is not None else _hl7_py.make_control_id

parse_ackPy = _hl7_py.parse_ack
parse_ackC = _fast.parse_ack if _fast is not None else None
parse_ack = _fast.parse_ack if _fast is not None else _hl7_py.parse_ack
