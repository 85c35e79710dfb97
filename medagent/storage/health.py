"""Whether durable storage may take new data: a small pure state machine (no I/O here).

States and transitions
----------------------
::

    OK --(free < low watermark)--> LOW_SPACE --(free >= resume level, reserve fits)--> OK
    OK/LOW_SPACE --(a write failed)--> FAILED --(a probe write succeeded)--> OK or LOW_SPACE

* OK: new data is accepted.
* LOW_SPACE: writes still work, but new data is refused so that state changes (confirmations),
  checkpoints and lease renewals keep their room.
* FAILED: a write failed (disk full, I/O error, read-only file). New data is refused cheaply,
  other writes are held back, and the owner probes storage with one small write per probe
  interval; the first success leaves FAILED. Free-space samples alone never leave FAILED (only a
  write proves storage works again).

The owner feeds events in (``observe(space)``, ``write_failed(reason)``, ``probe_succeeded``)
and gets a :class:`Transition` back exactly when the state changed, so it logs one line per
state change, never one per message.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from medagent.storage.errors import STORAGE_ERROR_PREFIX
from medagent.storage.space import DiskSpace, FreeSpaceWatermark

__all__ = ["LOW_SPACE_REASON", "StorageHealth", "StorageState", "Transition"]

#: What a refused record is told while free space is below the watermark.
LOW_SPACE_REASON = f"{STORAGE_ERROR_PREFIX}low disk space"


class StorageState(enum.IntEnum):
    OK = 0
    LOW_SPACE = 1
    FAILED = 2


@dataclass(frozen=True, slots=True)
class Transition:
    old: StorageState
    new: StorageState
    reason: str | None  # why new data is refused in the new state (None in OK)


class StorageHealth:
    def __init__(self, watermark: FreeSpaceWatermark) -> None:
        self.watermark = watermark
        self.state = StorageState.OK
        self.reason: str | None = None
        self.changes = 0

    @property
    def accepting(self) -> bool:
        return self.state is StorageState.OK

    @property
    def writable(self) -> bool:
        """False while FAILED: only probes should write."""
        return self.state is not StorageState.FAILED

    def _move(self, new: StorageState, reason: str | None) -> Transition | None:
        if new is self.state:
            self.reason = reason if new is not StorageState.OK else None
            return None
        change = Transition(self.state, new, reason)
        self.state, self.reason = new, reason
        self.changes += 1
        return change

    def observe(self, space: DiskSpace, *, extra_bytes: int = 0, ready: bool = True) -> Transition | None:
        """A free-space sample; ``extra_bytes`` is space the owner still has to take back (its
        reserve) before it may accept again; ``ready`` is False while the owner's own
        precondition for accepting again is missing (e.g. the WAL checkpoint it asked for)."""
        if self.state is StorageState.FAILED:
            return None
        if self.state is StorageState.OK:
            return self._move(StorageState.LOW_SPACE, LOW_SPACE_REASON) if self.watermark.is_low(space) else None
        if ready and self.watermark.can_resume(space, extra_bytes):
            return self._move(StorageState.OK, None)
        return None

    def write_failed(self, reason: str) -> Transition | None:
        return self._move(StorageState.FAILED, reason)

    def probe_succeeded(self, space: DiskSpace, *, extra_bytes: int = 0, ready: bool = True) -> Transition | None:
        """A write worked again: leave FAILED for OK, or LOW_SPACE while space is still short
        (or the owner is not ``ready``)."""
        if self.state is not StorageState.FAILED:
            return self.observe(space, extra_bytes=extra_bytes, ready=ready)
        if ready and self.watermark.can_resume(space, extra_bytes) and not self.watermark.is_low(space):
            return self._move(StorageState.OK, None)
        return self._move(StorageState.LOW_SPACE, LOW_SPACE_REASON)
