"""Issue 19 (T2): while a writer commits, the WAL checkpointer never holds it out to wait for a
reader, and it never cuts the WAL file; once the writer is idle the file is given back.

The writer here has no busy timeout: any RESTART or TRUNCATE that held the write lock while it
committed would show up as a "database is locked" error on its side (before this change, a
reader that pinned old frames made every round attempt a RESTART, and the WAL past
`truncate_above_bytes` a TRUNCATE that waited for the reader with the writer held out).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from testsupport import wait_until_sync

from medagent.storage.checkpoint import WalCheckpointer

_ROW = b"x" * 4000


@pytest.mark.parametrize("rounds_before_writes", [0, 2])
def test_a_pinned_wal_defers_restarts_and_an_idle_wal_is_truncated(tmp_path: Path, rounds_before_writes: int) -> None:
    """``rounds_before_writes`` = 2: the checkpointer's first rounds see only the pinned
    reader's frames (all copied), then the WAL grows past the RESTART threshold within one
    round; the RESTART must still wait for the reader to go (a CI run caught the race)."""
    path = tmp_path / "db.sqlite3"
    writer = sqlite3.connect(path, isolation_level=None, timeout=0)  # busy at once, never waits
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA synchronous = NORMAL")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("CREATE TABLE t (body BLOB)")
    writer.execute("INSERT INTO t VALUES (?)", (_ROW,))
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 1  # holds this snapshot
    wal = Path(f"{path}-wal")
    checkpointer = WalCheckpointer(path, interval_s=0.02, restart_above_bytes=64 * 1024,
                                   truncate_above_bytes=256 * 1024)
    checkpointer.start()
    assert wait_until_sync(lambda: checkpointer.checkpoints >= rounds_before_writes)
    written = 1
    locked = 0
    try:
        deadline = time.monotonic() + 20.0
        while checkpointer.deferrals < 3 and time.monotonic() < deadline:
            try:
                writer.execute("INSERT INTO t VALUES (?)", (_ROW,))
                written += 1
            except sqlite3.OperationalError as exc:  # only a checkpoint holding the write lock
                assert "locked" in str(exc)
                locked += 1
        assert checkpointer.deferrals >= 3, "the reader never pinned the WAL past the RESTART threshold"
        assert locked == 0, f"a checkpoint held the writer out {locked} times"
        assert checkpointer.restarts == 0 and checkpointer.truncations == 0
        assert wal.stat().st_size > 256 * 1024  # it grew: nothing cut it under the writer
        reader.execute("COMMIT")
        # The writer is idle now: the next rounds copy the rest and give the file back.
        assert wait_until_sync(lambda: checkpointer.truncations >= 1 and wal.stat().st_size == 0)
        assert checkpointer.errors == 0
    finally:
        checkpointer.stop()
        reader.close()
        writer.close()
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT count(*) FROM t").fetchone()[0] == written


def test_a_small_idle_wal_is_left_alone(tmp_path: Path) -> None:
    """Below both limits an idle WAL keeps its file (the next writer starts it over in place):
    sparse traffic does not pay a truncate and a file extension per message."""
    path = tmp_path / "db.sqlite3"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("CREATE TABLE t (body BLOB)")
    writer.executemany("INSERT INTO t VALUES (?)", [(_ROW,) for _ in range(10)])
    wal = Path(f"{path}-wal")
    size = wal.stat().st_size
    checkpointer = WalCheckpointer(path, interval_s=0.02)  # default limits: 16 and 64 MB
    checkpointer.start()
    try:
        assert wait_until_sync(lambda: checkpointer.checkpoints >= 5)
        assert checkpointer.truncations == 0 and wal.stat().st_size == size
    finally:
        checkpointer.stop()
        writer.close()


def test_a_restart_waits_for_the_writer_gate_and_runs_once_it_is_free(tmp_path: Path) -> None:
    """The writer holds `writer_gate` around each transaction: a RESTART takes it first, so it
    never starts inside a write (the commit behind it then wakes on the lock, not in SQLite's
    busy handler); held past `_GATE_WAIT_S` the round gives up and a later one restarts."""
    path = tmp_path / "db.sqlite3"
    writer = sqlite3.connect(path, isolation_level=None, timeout=0)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("CREATE TABLE t (body BLOB)")
    for _ in range(40):  # ~160 KB of frames: past the RESTART threshold below
        writer.execute("INSERT INTO t VALUES (?)", (_ROW,))
    checkpointer = WalCheckpointer(path, interval_s=0.02, restart_above_bytes=64 * 1024,
                                   truncate_above_bytes=64 * 1024 * 1024)
    checkpointer.writer_gate.acquire()  # a write transaction that lasts
    checkpointer.start()
    try:
        time.sleep(1.5)  # longer than one gate wait: that round gave up, a later one waits again
        assert checkpointer.restarts == 0 and checkpointer.truncations == 0
        assert checkpointer.errors == 0
        checkpointer.writer_gate.release()
        assert wait_until_sync(lambda: checkpointer.restarts + checkpointer.truncations >= 1)
    finally:
        if checkpointer.writer_gate.locked():
            checkpointer.writer_gate.release()
        checkpointer.stop()
        writer.close()


def wal_salt(path: Path) -> bytes:
    """The WAL header's checkpoint sequence and salts: a writer that starts the WAL over rewrites them."""
    with open(f"{path}-wal", "rb") as wal:
        return wal.read(24)[12:24]


def test_after_a_restart_the_checkpointer_starts_the_wal_over_itself(tmp_path: Path) -> None:
    """The first writer after a RESTART writes the WAL's new header and fdatasyncs it (up to
    ~100 ms on a busy disk): the checkpointer does that write while it still holds the writer
    gate, so the next intake commit does not. It changes no data (user_version rewritten with
    its own value)."""
    path = tmp_path / "db.sqlite3"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("PRAGMA user_version = 7")
    writer.execute("CREATE TABLE t (body BLOB)")
    writer.executemany("INSERT INTO t VALUES (?)", [(_ROW,) for _ in range(40)])  # ~160 KB of frames
    before = wal_salt(path)
    checkpointer = WalCheckpointer(path, interval_s=0.02, restart_above_bytes=64 * 1024)
    checkpointer.start()
    try:
        assert wait_until_sync(lambda: checkpointer.restarts >= 1)
        with checkpointer.writer_gate:  # the round has ended
            after = wal_salt(path)
        assert after != before  # the header was rewritten by the checkpointer: no writer wrote since
        assert checkpointer.errors == 0
    finally:
        checkpointer.stop()
    writer.execute("INSERT INTO t VALUES (?)", (_ROW,))
    assert writer.execute("PRAGMA user_version").fetchone()[0] == 7
    assert writer.execute("SELECT count(*) FROM t").fetchone()[0] == 41
    writer.close()
