"""An emergency reserve: space set aside while the disk has room, given back when it has none.

Theory of operation
-------------------
A watermark keeps the owner's *own* growth from filling the disk, but another program (a log,
a backup) can still take the last block. Then even tiny writes fail: confirming delivered rows,
renewing the queue lease, re-creating a WAL after a restart. So while space is plentiful the
owner keeps a reserve file of ``size_bytes`` allocated (``posix_fallocate``, or zeros where that
is missing), 0600, and deletes it the moment storage fails: its blocks are then free for the
writes that let the owner recover and deliver what it holds. It is allocated again only once
the disk has room for it *and* the watermark's resume level.

Invariants: the file is either absent or fully allocated (a partial allocation is removed);
``release`` never raises for a missing file; neither method raises for lack of space.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from medagent.storage.files import create_private_file

__all__ = ["ReserveFile"]

log = logging.getLogger("medagent.storage.reserve")

_CHUNK = 1024 * 1024


class ReserveFile:
    def __init__(self, path: str | os.PathLike[str], size_bytes: int) -> None:
        if size_bytes < 0:
            raise ValueError("size_bytes must be >= 0")
        self.path = Path(path)
        self.size_bytes = size_bytes

    @property
    def held(self) -> bool:
        """True when the reserve file exists with its full size (or no reserve is wanted)."""
        if self.size_bytes == 0:
            return True
        try:
            return self.path.stat().st_size >= self.size_bytes
        except OSError:
            return False

    @property
    def missing_bytes(self) -> int:
        """Bytes that allocating the reserve would take from the disk now."""
        return 0 if self.held else self.size_bytes

    def allocate(self) -> bool:
        """Allocate the reserve; False (and nothing left behind) when the disk has no room."""
        if self.held:
            return True
        try:
            fd = create_private_file(self.path)
            try:
                self._fill(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.path.unlink(missing_ok=True)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("cannot allocate the storage reserve %s: %s", self.path, exc)
            return False
        return True

    def _fill(self, fd: int) -> None:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, self.size_bytes)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        os.ftruncate(fd, 0)  # no fallocate on this file system: write real zeros
        zeros = bytes(_CHUNK)
        left = self.size_bytes
        while left > 0:
            left -= os.write(fd, zeros[: min(left, _CHUNK)])

    def release(self) -> bool:
        """Delete the reserve; True when it existed (its space is free now)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True
