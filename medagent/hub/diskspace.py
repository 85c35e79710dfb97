"""The hub's free-space watermark: refuse new messages before the disk is full.

Theory of operation
-------------------
When the file system under the data directory fills, SQLite fails commits with "database or
disk is full" and the hub can no longer write replies or checkpoint its WAL. So intake stops
*before* that: while the room left is below ``max(min_free_bytes, min_free_percent % of the file
system)``, intake holds the transmits it received (nothing stored, nothing acknowledged, the
agent's socket no longer read once the backlog is full: the agent keeps the messages in its own
durable queue) until there is room again; see :mod:`medagent.hub.intake`. The room left counts
the file system's free space (``statvfs`` ``f_bavail``, what an unprivileged writer may use) plus
the free pages inside ``hub.sqlite3``, which SQLite reuses before it grows the file — so
retention deleting rows makes room even though the file does not shrink.

The watermark and its hysteresis are the shared ones of :mod:`medagent.storage.space` (the
agent's queue uses the same): refuse below ``max(min_free_bytes, min_free_percent %)``, take
messages again only above that plus a margin, so a disk hovering at the limit gives one state
change, not one per message. The check is cached for ``CHECK_INTERVAL_S`` (a ``statvfs`` per
second, never per message). The store's free pages are read off the event loop by
:class:`FreePages` every ``CHECK_INTERVAL_S`` (the store is async; ``refusal()`` must not wait);
a PostgreSQL store's files are not on this disk and count 0. Each change of state is logged once.

Invariant: :meth:`DiskWatermark.refusal` returns ``None`` or a short reason without PHI; it
never raises (a failing ``statvfs`` counts as "room", since refusing all intake on a probe
error would be worse than SQLite's own error path).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from medagent.storage.space import DiskSpace, FreeSpaceWatermark, disk_space

__all__ = ["CHECK_INTERVAL_S", "LOW_DISK_ERROR", "DiskWatermark", "FreePages"]

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
LOW_DISK_ERROR = "Hub storage is nearly full"

_MIB = 1024 * 1024


class FreePages:
    """The store's free-page bytes, refreshed by a task: ``free_pages()`` reads the last value."""

    def __init__(self, read: Callable[[], Awaitable[int]], interval_s: float = CHECK_INTERVAL_S) -> None:
        self._read = read
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.value = 0

    def __call__(self) -> int:
        return self.value

    async def start(self) -> None:
        """Read once now (so the first check counts them), then every ``interval_s``."""
        await self._refresh()
        self._task = asyncio.create_task(self._loop(), name="medagent-hub-free-pages")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self._refresh()

    async def _refresh(self) -> None:
        try:
            self.value = await self._read()
        except Exception as exc:  # noqa: BLE001 - keep the last value; the store's own errors surface elsewhere
            log.debug("reading the store's free pages failed: %s", type(exc).__name__)


class DiskWatermark:
    """``refusal()`` -> None while there is room, else the ``agent:error`` text to answer with."""

    def __init__(self, path: Path, min_free_bytes: int, min_free_percent: float,
                 free_pages: Callable[[], int] = lambda: 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.watermark = FreeSpaceWatermark(min_free_bytes, min_free_percent / 100.0)
        self._free_pages = free_pages
        self._clock = clock
        self._checked_at: float | None = None
        self._refusal: str | None = None
        self.held = 0  #: transmits held back for want of room so far (for stats and tests)

    def room(self) -> DiskSpace:
        """What the hub may still use: the file system's free bytes plus hub.sqlite3's free pages."""
        space = disk_space(self.path)
        return DiskSpace(space.free_bytes + self._free_pages(), space.total_bytes)

    def check_now(self) -> str | None:
        """Like :meth:`refusal`, without the cache (after the limits or the disk changed)."""
        self._checked_at = None
        return self.refusal()

    def refusal(self) -> str | None:
        now = self._clock()
        if self._checked_at is not None and now - self._checked_at < CHECK_INTERVAL_S:
            return self._refusal
        self._checked_at = now
        try:
            room = self.room()
        except OSError as exc:
            log.warning("cannot read the free space of %s (%s); not limiting intake", self.path, exc.strerror)
            return self._refusal
        low = self.watermark.low_bytes(room.total_bytes)
        if self._refusal is None and self.watermark.is_low(room):
            self._refusal = (f"{LOW_DISK_ERROR} ({room.free_bytes // _MIB} MiB left, keeps {low // _MIB} MiB"
                             " free)")
            log.error("hub storage low: %d MiB left under %s, below the %d MiB watermark; refusing new"
                      " messages until there is room", room.free_bytes // _MIB, self.path, low // _MIB)
        elif self._refusal is not None and self.watermark.can_resume(room):
            self._refusal = None
            log.warning("hub storage has room again (%d MiB left); taking messages", room.free_bytes // _MIB)
        return self._refusal
