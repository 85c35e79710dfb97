"""Operator actions on a queue database, for the `medagent queue ...` command line.

Each function opens `<data_dir>/queue.sqlite3` with its own short-lived connection, does one
thing, and closes it. They are safe while an agent is running on the same data_dir: WAL lets
them read beside the agent's writer, and their writes are single short transactions that wait
up to `busy_timeout_s` for the agent's current transaction. They never take the single-writer
lease and never touch rows that still owe a delivery (RECEIVED, SENT), except `retry_failed`,
which turns FAILED rows back into pending ones; a running agent notices that within one lease
renewal (lease_ttl_s / 3) and delivers them in id order.

Bodies never leave these functions (PHI): listings carry sizes, control ids and reasons only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from medagent.queue.records import RowState
from medagent.queue.store import SPOOL_DIRNAME, QueueError, QueueStore
from medagent.storage.space import disk_space

__all__ = ["QUEUE_FILENAME", "PURGEABLE_STATES", "queue_path", "queue_stats", "list_failed", "retry_failed", "purge"]

#: File name of the queue database inside the agent's data_dir.
QUEUE_FILENAME = "queue.sqlite3"

#: `purge(state=...)` names and the row states they delete. Pending rows cannot be purged.
PURGEABLE_STATES: dict[str, tuple[RowState, ...]] = {
    "confirmed": (RowState.CONFIRMED,),
    "failed": (RowState.FAILED,),
    "settled": (RowState.CONFIRMED, RowState.FAILED),
}

_ADMIN_BUSY_TIMEOUT_S = 10.0


def queue_path(data_dir: str | os.PathLike[str]) -> Path:
    """Path of the queue database of `data_dir`."""
    return Path(data_dir) / QUEUE_FILENAME


@contextlib.contextmanager
def _open_store(data_dir: str | os.PathLike[str]) -> Iterator[QueueStore]:
    store = QueueStore(queue_path(data_dir), create=False, busy_timeout_s=_ADMIN_BUSY_TIMEOUT_S)
    try:
        yield store
    finally:
        store.close()


def queue_stats(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts by state, per-channel pending depth and age, sizes, queue_uuid, and the lease
    (who is writing: holder, host, pid, expiry) or None. Spool: `spool_files`/`spool_bytes`
    are the file payloads rows reference; `spool_disk_bytes` is everything under
    `<data_dir>/spool` (orphans and files being written included), `free_bytes` what the file
    system has left."""
    with _open_store(data_dir) as store:
        stats = store.stats()
        stats["lease"] = store.lease_info()
    stats["spool_disk_bytes"] = _tree_bytes(Path(data_dir) / SPOOL_DIRNAME)
    stats["free_bytes"] = disk_space(data_dir).free_bytes
    return stats


def _tree_bytes(root: Path) -> int:
    total = 0
    for directory, _subdirs, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:  # removed meanwhile
                pass
    return total


def list_failed(data_dir: str | os.PathLike[str], limit: int = 100) -> list[dict[str, Any]]:
    """FAILED rows, oldest first, without bodies (`size` = body length in bytes)."""
    with _open_store(data_dir) as store:
        return store.list_failed(limit)


def retry_failed(data_dir: str | os.PathLike[str], ids: Sequence[int] | None = None) -> int:
    """Put FAILED rows (all, or `ids`) back to RECEIVED for delivery. Returns rows changed."""
    with _open_store(data_dir) as store:
        return store.retry_failed(ids)


def purge(data_dir: str | os.PathLike[str], state: str = "confirmed", older_than_s: float | None = None) -> int:
    """Delete settled rows now instead of waiting for retention. `state` is "confirmed",
    "failed" or "settled" (both); with `older_than_s`, only rows settled longer ago than that.
    Returns rows deleted."""
    states = PURGEABLE_STATES.get(state)
    if states is None:
        raise QueueError(
            f"cannot purge state {state!r}: choose one of {', '.join(PURGEABLE_STATES)} "
            "(pending rows are never purged; they have not reached the hub yet)"
        )
    with _open_store(data_dir) as store:
        return store.purge(states, older_than_s)
