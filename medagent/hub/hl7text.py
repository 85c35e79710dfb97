"""HL7 v2 helpers for the hub, which holds messages as *text* (the agent already decoded them).

Theory of operation
-------------------
The websocket carries ER7 text (medplum-protocol.md §2.1), while :mod:`medagent.proto.hl7`
works on bytes. To scan a header or build an ACK the hub encodes the text with the charset the
message declares in MSH-18 (HL7 v2 ch. 2.14.9.18, table 0211), falling back to UTF-8 when MSH-18
is empty, unknown, or cannot represent the text; then it decodes the ACK bytes back to text with
:func:`medagent.proto.hl7.decode`, which honours the same MSH-18. So the text a bot returns is
always the text the agent will encode for the device with the channel's encoding.

Invariants: these helpers never log and never put message text into an exception message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medagent.proto import hl7

if TYPE_CHECKING:
    from medagent.proto.hl7 import Header

__all__ = ["scan_header", "message_bytes", "bytes_to_text", "ack_text", "short_type", "Hl7Error"]

Hl7Error = hl7.Hl7Error
_DEFAULT_CODEC = "utf-8"


def scan_header(text: str) -> Header | None:
    """The MSH of ``text`` (its header fields only), or ``None`` when it has no readable MSH."""
    try:
        return hl7.parse_header(text.encode(_DEFAULT_CODEC, "surrogatepass"))
    except hl7.Hl7Error:
        return None


def message_bytes(text: str, header: Header | None) -> bytes:
    """``text`` encoded with its MSH-18 charset (UTF-8 when unknown or not representable)."""
    codec = _codec(header)
    try:
        return text.encode(codec)
    except (UnicodeEncodeError, LookupError):
        return text.encode(_DEFAULT_CODEC, "surrogatepass")


def bytes_to_text(data: bytes) -> str:
    """HL7 bytes (a bot's reply) back to text, honouring a BOM or MSH-18."""
    try:
        return hl7.decode(data, _DEFAULT_CODEC)
    except (hl7.Hl7Error, UnicodeDecodeError, LookupError):
        return data.decode(_DEFAULT_CODEC, "replace")


def ack_text(text: str, header: Header | None, code: str, message: str | None = None) -> str:
    """An ACK (MSA-1 = ``code``, MSA-3 = ``message``) for the message ``text``, as text.

    Raises :class:`Hl7Error` when ``text`` has no readable MSH.
    """
    return bytes_to_text(hl7.build_ack(message_bytes(text, header), code, text=message))


def short_type(header: Header) -> str:
    """MSH-9 as ``code^trigger`` (e.g. "ADT^A01"), or just the code when there is no trigger."""
    trigger = header.trigger_event
    return f"{header.message_code}^{trigger}" if trigger else header.message_code


def _codec(header: Header | None) -> str:
    if header is None or not header.charset:
        return _DEFAULT_CODEC
    codec_for_charset = getattr(hl7, "codec_for_charset", None)
    if codec_for_charset is None:
        return _DEFAULT_CODEC
    try:
        codec = codec_for_charset(header.charset)
    except (hl7.Hl7Error, LookupError, ValueError):
        return _DEFAULT_CODEC
    return codec or _DEFAULT_CODEC
