"""MLLP frame decoder in pure Python: the specification twin of `medagent._fast._mllp`.

Standard: HL7 v2.x Implementation Guide, "Minimal Lower Layer Protocol" (MLLP Release 2),
block format: ``<SB> payload <EB><CR>`` with SB = 0x0B, EB = 0x1C, CR = 0x0D. The payload
never contains SB or EB. Users import `medagent.proto.mllp`, never this module.

Theory of operation
-------------------
The decoder is a three-state scanner fed with arbitrary chunks of a byte stream:

* ``HUNTING``: looking for SB. Every other byte (NUL, whitespace, garbage, a stray EB or CR) is
  junk outside a frame and is counted in `discarded_bytes`.
* ``IN_FRAME``: collecting payload. The scanner searches (``bytes.find``, i.e. memchr) for the
  next EB and for an SB before it:

  - EB: the frame is complete and is emitted at once, without waiting for the CR (lock-step
    senders need the lowest latency); the state becomes ``AFTER_END_BLOCK``.
  - SB before EB: the sender restarted mid-message. The partial payload is dropped, counted in
    `truncated_frames`, and the new frame starts.
  - neither, in a complete chunk: the payload so far is kept in a bytearray (`pending_bytes`)
    until later chunks complete it. When no partial is pending, complete frames are sliced
    straight out of the input chunk.

* ``AFTER_END_BLOCK``: the byte after EB. A CR is consumed (also when it arrives in the next
  chunk). Any other byte counts `missing_cr` (the frame is still accepted) and is then handled
  as in ``HUNTING``.

Oversize frames: as soon as a frame's payload exceeds `max_frame_size` bytes (that is, at its
``max_frame_size + 1``-th payload byte, even if its EB is in the same chunk), `feed` raises
`FrameTooLarge`. The exception carries the frames completed earlier in the same `feed` call
(they are not lost) and the first <= 4096 payload bytes of the rejected frame (`head`, so the
caller can read its MSH and answer AR with the right MSA-2). The partial frame is dropped, the
decoder returns to ``HUNTING``, and the bytes of the chunk after the overflow point are kept:
the next `feed` call (``feed(b"")`` is allowed) processes them before its own data. Bytes
discarded after the overflow (the rest of the oversize frame, its EB and CR) count in
`discarded_bytes`; the rejected frame's bytes up to the overflow point do not.

Invariants
----------
* The sequence of emitted frames and `FrameTooLarge` events (with their `head`), and every
  counter once all input is consumed, do not depend on how the stream is cut into chunks.
* A frame that is emitted is counted in `frames_decoded`, including the frames carried by a
  `FrameTooLarge`.
* ``0 <= pending_bytes <= max_frame_size``; `pending_bytes` is 0 outside ``IN_FRAME``.
* The Cython twin reproduces all observable behaviour of this module exactly (frames, exception
  points and payloads, every counter); differential tests check this on random streams.
* No payload bytes appear in exception messages or reprs (PHI).
"""

from __future__ import annotations

import operator
import sys
from enum import IntEnum
from typing import Final, NoReturn

__all__ = [
    "START_BLOCK",
    "END_BLOCK",
    "CARRIAGE_RETURN",
    "DEFAULT_MAX_FRAME_SIZE",
    "FRAME_HEAD_LIMIT",
    "ScanState",
    "MllpError",
    "FrameTooLarge",
    "MllpDecoderPy",
    "validated_max_frame_size",
]

START_BLOCK: Final = 0x0B
END_BLOCK: Final = 0x1C
CARRIAGE_RETURN: Final = 0x0D
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024
#: How many leading payload bytes of a rejected frame `FrameTooLarge.head` keeps.
FRAME_HEAD_LIMIT: Final = 4096


class ScanState(IntEnum):
    """Where the decoder stands in the byte stream."""

    HUNTING = 0
    IN_FRAME = 1
    AFTER_END_BLOCK = 2


# Plain ints for the scanning loop (IntEnum comparisons are slower); same values as ScanState.
_HUNTING: Final = 0
_IN_FRAME: Final = 1
_AFTER_END_BLOCK: Final = 2


class MllpError(Exception):
    """Base class of MLLP framing errors."""


class FrameTooLarge(MllpError):
    """A frame's payload exceeded the decoder's `max_frame_size`; the frame was dropped.

    Attributes:
        limit: the `max_frame_size` in force.
        frames: complete frames decoded earlier in the same `feed` call; handle them as if
            `feed` had returned them.
        head: the first <= 4096 payload bytes of the rejected frame (enough to read its MSH).

    After catching it, call ``feed(b"")`` (or feed the next chunk) to continue with the bytes
    that followed the overflow point.
    """

    limit: int
    frames: list[bytes]
    head: bytes

    def __init__(self, limit: int, frames: list[bytes], head: bytes) -> None:
        super().__init__(
            f"MLLP frame larger than max_frame_size ({limit} bytes) was dropped; "
            "raise max_frame_size if such messages are legitimate"
        )
        self.limit = limit
        self.frames = frames
        self.head = head

    def __reduce__(self) -> tuple[type[FrameTooLarge], tuple[int, list[bytes], bytes]]:
        return (type(self), (self.limit, self.frames, self.head))


def validated_max_frame_size(value: object) -> int:
    """Return `value` as an int in 1..sys.maxsize, or raise TypeError/ValueError."""
    try:
        limit = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"max_frame_size must be an int, not {type(value).__name__}") from None
    if not 1 <= limit <= sys.maxsize:
        raise ValueError(f"max_frame_size must be between 1 and {sys.maxsize}, not {limit}")
    return limit


def as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """The input chunk as bytes (no copy for bytes); TypeError for non-buffers."""
    if type(data) is bytes:
        return data
    return bytes(memoryview(data))


class MllpDecoderPy:
    """Incremental MLLP decoder (pure Python). See the module docstring for the rules."""

    __slots__ = (
        "_max_frame_size",
        "_state",
        "_partial",
        "_remainder",
        "_discarded_bytes",
        "_missing_cr",
        "_truncated_frames",
        "_frames_decoded",
    )

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self._max_frame_size = validated_max_frame_size(max_frame_size)
        self._state = _HUNTING
        self._partial = bytearray()
        self._remainder = b""
        self._discarded_bytes = 0
        self._missing_cr = 0
        self._truncated_frames = 0
        self._frames_decoded = 0

    @property
    def max_frame_size(self) -> int:
        """Largest accepted payload, in bytes."""
        return self._max_frame_size

    @property
    def discarded_bytes(self) -> int:
        """Bytes outside frames that were skipped (junk, NUL, whitespace, rest of oversize frames)."""
        return self._discarded_bytes

    @property
    def missing_cr(self) -> int:
        """Frames whose EB was not followed by CR (tolerated)."""
        return self._missing_cr

    @property
    def truncated_frames(self) -> int:
        """Partial frames abandoned because a new SB arrived before their EB."""
        return self._truncated_frames

    @property
    def frames_decoded(self) -> int:
        """Frames emitted so far (also those carried by FrameTooLarge)."""
        return self._frames_decoded

    @property
    def pending_bytes(self) -> int:
        """Payload bytes of the partial frame currently held."""
        return len(self._partial)

    def reset(self) -> None:
        """Drop any partial frame and unprocessed input; hunt for SB again. Counters are kept."""
        self._partial.clear()
        self._remainder = b""
        self._state = _HUNTING

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume a chunk; return the payloads of the frames it completes, in order.

        Raises FrameTooLarge (see the module docstring); the next call continues after it.
        """
        buf = as_bytes(data)
        if self._remainder:
            buf = self._remainder + buf
            self._remainder = b""
        frames: list[bytes] = []
        partial = self._partial
        state = self._state
        pos = 0
        end = len(buf)
        while pos < end:
            if state == _IN_FRAME:
                room = self._max_frame_size - len(partial)
                stop = min(end, pos + room + 1)
                eb = buf.find(END_BLOCK, pos, stop)
                sb = buf.find(START_BLOCK, pos, stop if eb < 0 else eb)
                if sb >= 0:
                    self._truncated_frames += 1
                    partial.clear()
                    pos = sb + 1
                elif eb >= 0:
                    if partial:
                        partial += buf[pos:eb]
                        frames.append(bytes(partial))
                        partial.clear()
                    else:
                        frames.append(buf[pos:eb])
                    self._frames_decoded += 1
                    pos = eb + 1
                    state = _AFTER_END_BLOCK
                elif stop - pos > room:
                    self._reject_oversize(buf, pos, pos + room + 1, frames)
                else:
                    partial += buf[pos:end]
                    pos = end
            elif state == _HUNTING:
                sb = buf.find(START_BLOCK, pos)
                if sb < 0:
                    self._discarded_bytes += end - pos
                    pos = end
                else:
                    self._discarded_bytes += sb - pos
                    pos = sb + 1
                    state = _IN_FRAME
            else:
                if buf[pos] == CARRIAGE_RETURN:
                    pos += 1
                else:
                    self._missing_cr += 1
                state = _HUNTING
        self._state = state
        return frames

    def _reject_oversize(self, buf: bytes, pos: int, overflow_end: int, frames: list[bytes]) -> NoReturn:
        """Drop the frame whose payload overflows at `overflow_end`; keep the rest of `buf`."""
        partial = self._partial
        head = bytes(partial[:FRAME_HEAD_LIMIT])
        if len(head) < FRAME_HEAD_LIMIT:
            head += buf[pos : min(overflow_end, pos + FRAME_HEAD_LIMIT - len(head))]
        partial.clear()
        self._state = _HUNTING
        self._remainder = buf[overflow_end:]
        raise FrameTooLarge(self._max_frame_size, frames, head)
