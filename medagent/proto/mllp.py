"""MLLP framing (HL7 v2.x Implementation Guide, "Minimal Lower Layer Protocol", Release 2).

A frame is ``SB payload EB CR`` with SB = 0x0B, EB = 0x1C, CR = 0x0D; the payload (an HL7
message in the channel's encoding) never contains SB or EB. This selector module is the only
one users import:

* `encode(payload)` builds a frame.
* `MllpDecoder(max_frame_size)` turns a byte stream, cut into arbitrary chunks, into payloads:
  ``decoder.feed(chunk) -> list[bytes]``. It tolerates junk outside frames (counted in
  `discarded_bytes`), a missing CR after EB (`missing_cr`) and senders that restart mid-frame
  (`truncated_frames`), and raises `FrameTooLarge` for a frame over `max_frame_size`, carrying
  the frames completed before it and the head of the rejected frame. After the error, call
  ``feed(b"")`` (or feed the next chunk): the bytes after the overflow point are processed then.
  Full rules: `medagent.proto._mllp_py`.

`MllpDecoderPy` is the pure-Python specification, `MllpDecoderC` the Cython twin (None in pure
mode or when it is not built), and `MllpDecoder` whichever `medagent._compat` selected.

Invariant: both twins give identical frames, exceptions and counters for any input and any
chunking of it.

Typical adapter loop::

    data = chunk
    while True:
        try:
            frames = decoder.feed(data)
            break
        except FrameTooLarge as exc:
            handle(exc.frames)        # complete frames before the oversize one
            reject(exc.head)          # AR built from the rejected frame's MSH
            data = b""                # continue after the overflow point
    handle(frames)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from medagent._compat import load_fast
from medagent.proto._mllp_py import (
    CARRIAGE_RETURN,
    DEFAULT_MAX_FRAME_SIZE,
    END_BLOCK,
    FRAME_HEAD_LIMIT,
    START_BLOCK,
    FrameTooLarge,
    MllpDecoderPy,
    MllpError,
)

__all__ = [
    "START_BLOCK",
    "END_BLOCK",
    "CARRIAGE_RETURN",
    "DEFAULT_MAX_FRAME_SIZE",
    "FRAME_HEAD_LIMIT",
    "MllpError",
    "FrameTooLarge",
    "InvalidPayload",
    "encode",
    "MllpDecoder",
    "MllpDecoderPy",
    "MllpDecoderC",
]

_FRAME_START: Final = bytes((START_BLOCK,))
_FRAME_END: Final = bytes((END_BLOCK, CARRIAGE_RETURN))


class InvalidPayload(MllpError, ValueError):
    """A payload to send contains SB (0x0B) or EB (0x1C), which MLLP cannot carry."""


def encode(payload: bytes | bytearray | memoryview) -> bytes:
    """Frame `payload` as SB + payload + EB + CR.

    Raises InvalidPayload if the payload contains SB or EB: the receiver would cut the message
    there (MLLP Release 2 forbids both inside the payload).
    """
    frame = b"".join((_FRAME_START, payload, _FRAME_END))
    if frame.find(START_BLOCK, 1) >= 0 or frame.find(END_BLOCK, 1, -2) >= 0:
        raise InvalidPayload(
            "MLLP payload contains a start block (0x0B) or end block (0x1C) byte; "
            "these cannot be sent inside an MLLP frame"
        )
    return frame


if TYPE_CHECKING:
    from medagent._fast._mllp import MllpDecoderC as _MllpDecoderCType

_fast = load_fast("_mllp")

MllpDecoderC: type[_MllpDecoderCType] | None = _fast.MllpDecoderC if _fast is not None else None
MllpDecoder: type[MllpDecoderPy] | type[_MllpDecoderCType] = (
    MllpDecoderC if MllpDecoderC is not None else MllpDecoderPy
)
