"""WalCheckpointer.request_truncate: the WAL file goes back to zero bytes at once (without
waiting out the interval), and `truncate_pending` says when that happened."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from medagent.storage.checkpoint import WalCheckpointer


def test_requested_truncate_runs_without_waiting_for_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t (body BLOB)")
    conn.executemany("INSERT INTO t VALUES (?)", [(b"x" * 4000,) for _ in range(200)])
    wal = Path(f"{path}-wal")
    checkpointer = WalCheckpointer(path, interval_s=3600.0)  # would never run on its own here
    checkpointer.start()
    try:
        assert wal.stat().st_size > 500_000 and not checkpointer.truncate_pending
        checkpointer.request_truncate()
        deadline = time.monotonic() + 10.0
        while checkpointer.truncate_pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not checkpointer.truncate_pending and checkpointer.truncations == 1
        assert wal.stat().st_size == 0
    finally:
        checkpointer.stop()
        conn.close()
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 200


def test_under_steady_writes_the_wal_starts_over_without_a_truncate(tmp_path: Path) -> None:
    """A writer that never pauses: PASSIVE rounds alone never let the WAL start over (issue 19's
    stalls: it grew to the TRUNCATE limit); the RESTART past `restart_above_bytes` does, so the
    WAL stays a fraction of what is written. Each RESTART round first syncs the files without a
    lock, so the RESTART's own sync (with the writer held out) has little left to write."""
    path = tmp_path / "db.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t (body BLOB)")
    wal = Path(f"{path}-wal")
    restart_above = 256 * 1024
    checkpointer = WalCheckpointer(path, interval_s=0.02, restart_above_bytes=restart_above,
                                   truncate_above_bytes=1 << 40)
    checkpointer.start()
    rows = 0
    largest_wal = 0
    try:
        deadline = time.monotonic() + 30.0
        # Written until the WAL is a fraction of what went through it (without the restarts it
        # holds all of it, so this runs to the deadline and fails); a starved checkpointer on a
        # loaded machine just needs more rows before the ratio shows.
        while (checkpointer.restarts < 3 or rows * 4000 < 32 * restart_above
               or largest_wal >= rows * 4000 / 4) and time.monotonic() < deadline:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO t VALUES (?)", [(b"x" * 4000,)] * 4)
            conn.execute("COMMIT")
            rows += 4
            largest_wal = max(largest_wal, wal.stat().st_size)
            time.sleep(0.001)
    finally:
        checkpointer.stop()
    assert checkpointer.restarts >= 3 and checkpointer.truncations == 0
    assert checkpointer.syncs >= checkpointer.restarts
    written = rows * 4000
    assert written >= 32 * restart_above
    assert largest_wal < written / 4  # without the restarts the WAL holds all of it
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == rows
    conn.close()
