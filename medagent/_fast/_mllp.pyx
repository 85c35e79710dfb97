# cython: language_level=3, embedsignature=True
"""MLLP frame decoder, Cython twin of `medagent.proto._mllp_py` (the specification).

Standard: HL7 v2.x Implementation Guide, "Minimal Lower Layer Protocol" (MLLP Release 2):
``<SB=0x0B> payload <EB=0x1C><CR=0x0D>``. Never import this module directly; use
`medagent.proto.mllp`, which selects it through `medagent._compat.load_fast("_mllp")`.

Theory of operation: the same three-state scanner as the pure twin (HUNTING, IN_FRAME,
AFTER_END_BLOCK), with `memchr` over the chunk's contiguous buffer instead of `bytes.find`.
`feed` takes a pointer to the input (bytes directly, other buffers through a
``const unsigned char[::1]`` view, non-contiguous ones via a copy) and `_scan` works on that
pointer only: no Python work per byte. When no partial frame is pending, complete frames are
sliced straight out of the chunk with one `PyBytes_FromStringAndSize`; a bytearray is used
only to hold a partial frame across chunks.

Invariants: every observable result (frames, `FrameTooLarge` with its `frames` and `head`,
every counter, the resume-after-overflow remainder) equals the pure twin's, for any input and
chunking; the exceptions, limits and validation are imported from the pure twin so they cannot
drift apart. `_scan` is the only function compiled without bounds/wraparound checks; it reads
only ``buf[0:end]``, with every index kept in ``0 <= pos <= end`` (audited below).
"""

cimport cython

from medagent._fast._scan cimport find_byte
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcpy

from medagent.proto._mllp_py import (
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_HEAD_LIMIT,
    FrameTooLarge,
    MllpError,
    as_bytes,
    validated_max_frame_size,
)

__all__ = ["MllpDecoderC", "MllpError", "FrameTooLarge"]

cdef enum:
    SB = 0x0B
    EB = 0x1C
    CR = 0x0D

cdef enum ScanState:
    HUNTING = 0
    IN_FRAME = 1
    AFTER_END_BLOCK = 2

cdef Py_ssize_t HEAD_LIMIT = FRAME_HEAD_LIMIT




cdef inline int append_bytes(bytearray target, const unsigned char* src, Py_ssize_t n) except -1:
    """target += src[0:n] without an intermediate bytes object."""
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(target)
    if n <= 0:
        return 0
    PyByteArray_Resize(target, old + n)
    memcpy(PyByteArray_AS_STRING(target) + old, src, <size_t>n)
    return 0


@cython.final
cdef class MllpDecoderC:
    """Incremental MLLP decoder (Cython). Same rules as medagent.proto._mllp_py.MllpDecoderPy."""

    cdef Py_ssize_t _max_frame_size
    cdef Py_ssize_t _discarded_bytes
    cdef Py_ssize_t _missing_cr
    cdef Py_ssize_t _truncated_frames
    cdef Py_ssize_t _frames_decoded
    cdef ScanState _state
    cdef bytearray _partial
    cdef bytes _remainder

    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
        self._max_frame_size = validated_max_frame_size(max_frame_size)
        self._state = HUNTING
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
        return PyByteArray_GET_SIZE(self._partial)

    def reset(self) -> None:
        """Drop any partial frame and unprocessed input; hunt for SB again. Counters are kept."""
        PyByteArray_Resize(self._partial, 0)
        self._remainder = b""
        self._state = HUNTING

    def feed(self, data) -> list:
        """Consume a chunk; return the payloads of the frames it completes, in order.

        Raises FrameTooLarge (see medagent.proto._mllp_py); the next call continues after it.
        """
        cdef const unsigned char[::1] view
        cdef bytes chunk
        if PyBytes_GET_SIZE(self._remainder):
            data = self._remainder + as_bytes(data)
            self._remainder = b""
        if type(data) is bytes:
            chunk = <bytes>data
            return self._scan(<const unsigned char*>PyBytes_AS_STRING(chunk), PyBytes_GET_SIZE(chunk))
        try:
            view = data
        except (TypeError, ValueError, BufferError):
            chunk = as_bytes(data)  # non-contiguous or not bytes-shaped: copy, as the pure twin does
            return self._scan(<const unsigned char*>PyBytes_AS_STRING(chunk), PyBytes_GET_SIZE(chunk))
        if view.shape[0] == 0:
            return []
        return self._scan(&view[0], view.shape[0])

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef list _scan(self, const unsigned char* buf, Py_ssize_t end):
        # Audit: pos only grows, and only to values <= end (pos + 1 with pos < end, hit + 1
        # with hit < stop <= end, or end). Every read is buf[pos] with pos < end or a memchr
        # over [start, stop) with 0 <= start <= stop <= end; slices copy [pos, hit) or
        # [pos, end). `room` >= 0 because the partial never exceeds the limit.
        cdef list frames = []
        cdef bytearray partial = self._partial
        cdef ScanState state = self._state
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t room, stop, eb, sb, pending
        while pos < end:
            if state == IN_FRAME:
                pending = PyByteArray_GET_SIZE(partial)
                room = self._max_frame_size - pending
                stop = end if end - pos <= room else pos + room + 1
                eb = find_byte(buf, pos, stop, EB)
                sb = find_byte(buf, pos, stop if eb < 0 else eb, SB)
                if sb >= 0:
                    self._truncated_frames += 1
                    PyByteArray_Resize(partial, 0)
                    pos = sb + 1
                elif eb >= 0:
                    if pending:
                        append_bytes(partial, buf + pos, eb - pos)
                        frames.append(PyBytes_FromStringAndSize(
                            PyByteArray_AS_STRING(partial), PyByteArray_GET_SIZE(partial)))
                        PyByteArray_Resize(partial, 0)
                    else:
                        frames.append(PyBytes_FromStringAndSize(<const char*>buf + pos, eb - pos))
                    self._frames_decoded += 1
                    pos = eb + 1
                    state = AFTER_END_BLOCK
                elif stop - pos > room:
                    self._reject_oversize(buf, pos, pos + room + 1, end, frames)
                else:
                    append_bytes(partial, buf + pos, end - pos)
                    pos = end
            elif state == HUNTING:
                sb = find_byte(buf, pos, end, SB)
                if sb < 0:
                    self._discarded_bytes += end - pos
                    pos = end
                else:
                    self._discarded_bytes += sb - pos
                    pos = sb + 1
                    state = IN_FRAME
            else:
                if buf[pos] == CR:
                    pos += 1
                else:
                    self._missing_cr += 1
                state = HUNTING
        self._state = state
        return frames

    cdef int _reject_oversize(self, const unsigned char* buf, Py_ssize_t pos,
                              Py_ssize_t overflow_end, Py_ssize_t end, list frames) except -1:
        """Drop the frame whose payload overflows at `overflow_end`; keep buf[overflow_end:end]."""
        cdef bytearray partial = self._partial
        cdef Py_ssize_t pending = PyByteArray_GET_SIZE(partial)
        cdef Py_ssize_t from_partial = pending if pending < HEAD_LIMIT else HEAD_LIMIT
        cdef Py_ssize_t from_chunk = min(overflow_end - pos, HEAD_LIMIT - from_partial)
        cdef bytes head = PyBytes_FromStringAndSize(NULL, from_partial + from_chunk)
        cdef char* out = PyBytes_AS_STRING(head)
        memcpy(out, PyByteArray_AS_STRING(partial), <size_t>from_partial)
        memcpy(out + from_partial, buf + pos, <size_t>from_chunk)
        PyByteArray_Resize(partial, 0)
        self._state = HUNTING
        self._remainder = PyBytes_FromStringAndSize(<const char*>buf + overflow_end, end - overflow_end)
        raise FrameTooLarge(self._max_frame_size, frames, head)
