"""Free space on the data file system, and the watermark below which new data is refused.

Theory of operation
-------------------
Stopping intake only when SQLite reports "database or disk is full" is too late: the commit
acknowledgements that let delivered rows go, the WAL checkpoints that return space, and the
lease renewals all need a little room themselves. So an owner of durable data samples the free
space (``statvfs``: blocks available to an unprivileged process, the conservative figure) and
refuses *new* data while it is below the low watermark: ``max(min_free_bytes,
min_free_fraction * total)`` (defaults 50 MiB and 2 %, the issue's figures). It accepts again
only above the resume level, the low watermark plus a margin (a tenth of it, but at least
1 MiB or the watermark itself if that is smaller; 1 MiB when the watermark is disabled),
so a disk hovering at the watermark gives one state change, not one per message.

Sampling costs one system call (about a microsecond); owners throttle it (see
:class:`SpaceSampler`), never per message.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DiskSpace", "FreeSpaceWatermark", "SpaceSampler", "disk_space"]

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DiskSpace:
    free_bytes: int  # available to an unprivileged process
    total_bytes: int


def disk_space(path: str | os.PathLike[str]) -> DiskSpace:
    """Free and total bytes of the file system holding ``path`` (which must exist)."""
    if hasattr(os, "statvfs"):
        st = os.statvfs(path)
        return DiskSpace(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)
    usage = shutil.disk_usage(path)  # Windows
    return DiskSpace(usage.free, usage.total)


@dataclass(frozen=True, slots=True)
class FreeSpaceWatermark:
    """Refuse new data below ``low_bytes(total)``; accept again from ``resume_bytes(total)``.

    Zero for both limits disables the watermark (storage errors still stop intake)."""

    min_free_bytes: int = 50 * _MIB
    min_free_fraction: float = 0.02

    def __post_init__(self) -> None:
        if self.min_free_bytes < 0 or not 0.0 <= self.min_free_fraction < 1.0:
            raise ValueError("min_free_bytes must be >= 0 and min_free_fraction in [0, 1)")

    @classmethod
    def from_config(cls, min_free_mb: float, min_free_percent: float) -> FreeSpaceWatermark:
        return cls(int(min_free_mb * _MIB), min_free_percent / 100.0)

    def low_bytes(self, total_bytes: int) -> int:
        return max(self.min_free_bytes, int(self.min_free_fraction * total_bytes))

    def resume_bytes(self, total_bytes: int) -> int:
        low = self.low_bytes(total_bytes)
        if low == 0:  # no watermark: still never resume at zero bytes free after a failure
            return _MIB
        return low + max(low // 10, min(low, _MIB))

    def is_low(self, space: DiskSpace) -> bool:
        return space.free_bytes < self.low_bytes(space.total_bytes)

    def can_resume(self, space: DiskSpace, extra_bytes: int = 0) -> bool:
        """True when ``extra_bytes`` more could be used and free space would stay at resume level."""
        return space.free_bytes - extra_bytes >= self.resume_bytes(space.total_bytes)


class SpaceSampler:
    """Throttled :func:`disk_space`: a fresh sample at most every ``interval_s`` or after
    ``every_bytes`` were written, whichever comes first."""

    def __init__(self, path: Path, *, interval_s: float = 0.1, every_bytes: int = 4 * _MIB) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self.every_bytes = every_bytes
        self.last: DiskSpace | None = None
        self._taken_at = -float("inf")
        self._written = 0

    def wrote(self, nbytes: int) -> None:
        self._written += nbytes

    def due(self) -> bool:
        return self._written >= self.every_bytes or time.monotonic() - self._taken_at >= self.interval_s

    def sample(self) -> DiskSpace:
        self.last = disk_space(self.path)
        self._taken_at = time.monotonic()
        self._written = 0
        return self.last
