"""The intake journal: a lone record made durable by one framed `write()` (docs/intake-journal.md).

Why: at one lock-step sender every record is its own SQLite commit (an autocommit INSERT: locks,
WAL frames, wal-index update, ~50-80 µs of CPU), and nothing can be grouped. One `write()` of the
record to an `O_APPEND` file makes the same promise as `synchronous=NORMAL` (it is in the OS page
cache: it survives kill -9 of the process, not a power loss) for a few µs. The store
(`QueueStore`) moves journal records into SQLite later in one transaction and then empties this
file; this module only frames, appends, reads back and truncates.

Frame: ``<u32 payload length><u32 CRC-32 of the payload><payload>``; the payload is a version
byte, then the row's fixed fields (id, received_at, updated_at, duplicate_of, file_size; -1 for
None) and its nine text/bytes fields, each ``<i32 length>`` + bytes (-1 for None). A frame whose
length runs past the end of the file or whose CRC does not match ends the replay (a torn tail).
After a failed or short write the file is truncated back to the last good frame, so no partial
frame stays in front of the next one; if even that truncate fails the journal refuses appends
(`broken`) until the store empties it.

A row is the tuple the store's INSERT takes: (id, channel, remote, sender, control_id,
message_type, content_type, body, received_at, duplicate_of, updated_at, file_path, file_size,
file_sha256).
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from pathlib import Path
from typing import Any

__all__ = ["IntakeJournal", "JournalRow", "decode_frames", "encode_frame"]

JournalRow = tuple[Any, ...]

_VERSION = 1
_HEADER = struct.Struct("<II")  # payload length, CRC-32 of the payload
_FIXED = struct.Struct("<BqddqqIIIIIII")  # version, 5 numbers, lengths of the 7 always-present fields
_OPTIONAL = struct.Struct("<ii")  # lengths of file_path, file_sha256 (-1: None)
_MAX_PAYLOAD = 1 << 31  # a length beyond this is garbage, not a record


def _text(value: str | None) -> bytes | None:
    return None if value is None else value.encode("utf-8", "surrogateescape")


def encode_frame(row: JournalRow) -> bytes:
    """One record as a frame (header + payload)."""
    (row_id, channel, remote, sender, control_id, message_type, content_type, body, received_at,
     duplicate_of, updated_at, file_path, file_size, file_sha256) = row
    texts = (channel.encode(), remote.encode(), sender.encode(), control_id.encode(),
             message_type.encode(), content_type.encode(), bytes(body))
    path, digest = _text(file_path), _text(file_sha256)
    payload = b"".join((
        _FIXED.pack(_VERSION, row_id, received_at, updated_at,
                    -1 if duplicate_of is None else duplicate_of, -1 if file_size is None else file_size,
                    *map(len, texts)),
        _OPTIONAL.pack(-1 if path is None else len(path), -1 if digest is None else len(digest)),
        *texts, path or b"", digest or b"",
    ))
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> JournalRow:
    fields = _FIXED.unpack_from(payload, 0)
    if fields[0] != _VERSION:
        raise ValueError("unknown journal frame version")
    _, row_id, received_at, updated_at, duplicate_of, file_size, *lengths = fields
    optional = _OPTIONAL.unpack_from(payload, _FIXED.size)
    offset = _FIXED.size + _OPTIONAL.size
    values: list[Any] = []
    for length in (*lengths, *optional):
        if length < 0:
            values.append(None)
            continue
        values.append(payload[offset:offset + length])
        offset += length
    if offset != len(payload):
        raise ValueError("journal frame length mismatch")
    channel, remote, sender, control_id, message_type, content_type, body, path, digest = values
    decode = bytes.decode
    return (
        row_id, decode(channel), decode(remote), decode(sender), decode(control_id), decode(message_type),
        decode(content_type), body, received_at, None if duplicate_of < 0 else duplicate_of, updated_at,
        None if path is None else path.decode("utf-8", "surrogateescape"),
        None if file_size < 0 else file_size,
        None if digest is None else digest.decode("utf-8", "surrogateescape"),
    )


def decode_frames(data: bytes) -> tuple[list[JournalRow], int]:
    """The rows of every valid frame from the start of `data`, and the offset where the valid
    frames end (len(data) when there is no torn or corrupt tail)."""
    rows: list[JournalRow] = []
    offset, size = 0, len(data)
    while offset + _HEADER.size <= size:
        length, crc = _HEADER.unpack_from(data, offset)
        start, end = offset + _HEADER.size, offset + _HEADER.size + length
        if length >= _MAX_PAYLOAD or end > size:
            break
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            break
        try:
            rows.append(_decode_payload(payload))
        except (ValueError, struct.error, UnicodeDecodeError):
            break
        offset = end
    return rows, offset


class IntakeJournal:
    """The journal file: append a frame, read every valid frame back, empty it (0600, O_APPEND)."""

    def __init__(self, path: Path) -> None:
        """Opens (creating) the file; raises OSError."""
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(self._fd, 0o600)  # whatever the umask, and a file left by an older run
            self.size = os.fstat(self._fd).st_size  # bytes of good frames (after read_rows: exactly)
        except OSError:
            os.close(self._fd)
            raise
        self.broken = False  # a partial frame could not be cut off: no appends until reset()

    def read_rows(self) -> tuple[list[JournalRow], int]:
        """Every valid frame's row, and the bytes of torn or corrupt tail after them."""
        chunks: list[bytes] = []
        offset = 0
        while chunk := os.pread(self._fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        data = b"".join(chunks)
        rows, good = decode_frames(data)
        self.size = good
        return rows, len(data) - good

    def append(self, frame: bytes) -> None:
        """Write one frame with one write(); on a failed or short write cut the file back to the
        last good frame and raise OSError (the record is not in the journal)."""
        if self.broken:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        try:
            written = os.write(self._fd, frame)
        except OSError:
            self._cut_back()
            raise
        if written != len(frame):  # a short write to a regular file: the disk (or a size limit) is full
            self._cut_back()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.size += written

    def _cut_back(self) -> None:
        try:
            os.ftruncate(self._fd, self.size)
        except OSError:
            self.broken = True

    def reset(self) -> None:
        """Empty the file (every record in it is in SQLite now); raises OSError."""
        os.ftruncate(self._fd, 0)
        self.size = 0
        self.broken = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
