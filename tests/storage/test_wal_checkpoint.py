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
