"""The background WAL checkpointer copies the WAL back without the writer's help and loses nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from testsupport import wait_until_sync

from medagent.queue.checkpoint import WalCheckpointer


def _writer(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
    return conn


def test_wal_is_truncated_in_the_background_and_rows_survive(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    conn = _writer(path)
    conn.executemany("INSERT INTO t (body) VALUES (?)", [(b"x" * 4000,) for _ in range(500)])
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 1_000_000  # nothing checkpointed it: autocheckpoint is off
    checkpointer = WalCheckpointer(path, interval_s=0.05, truncate_above_bytes=100_000)
    checkpointer.start()
    try:
        assert wait_until_sync(lambda: wal.stat().st_size == 0)
        assert checkpointer.checkpoints > 0 and checkpointer.errors == 0
    finally:
        checkpointer.stop()
    conn.close()
    check = sqlite3.connect(path)
    assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 500
    check.close()


def test_stop_is_bounded_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    _writer(path).close()
    checkpointer = WalCheckpointer(path, interval_s=30.0)
    checkpointer.start()
    checkpointer.stop()  # wakes the 30 s wait at once instead of sleeping it out
    checkpointer.stop()
    assert not checkpointer._thread.is_alive()


def test_a_missing_database_directory_is_logged_not_raised(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    checkpointer = WalCheckpointer(tmp_path / "missing" / "db.sqlite3", interval_s=0.01)
    checkpointer.start()
    checkpointer.stop()
    assert "cannot open" in caplog.text
