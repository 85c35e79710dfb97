"""The stats recount reads the table in id ranges, one short read transaction each (issue 19, T2:
a whole-table scan held the WAL for up to a second at the size cap, so no checkpoint could copy
past it). Its totals must equal one whole-table count, across range borders and id gaps; and the
writer's WAL file is bounded by `journal_size_limit`. Real SQLite files in tmp_path."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_store import OFF, record

import medagent.queue.store as store_module
from medagent.queue.records import RowState
from medagent.queue.store import QueueStore
from medagent.storage.checkpoint import WAL_SIZE_LIMIT_BYTES


def _whole_table_counts(path: Path) -> dict[int, int]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM messages GROUP BY state").fetchall())


def test_ranged_recount_equals_a_whole_table_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_STATS_RANGE_IDS", 7)  # many ranges over 100 rows
    store = QueueStore(tmp_path / "queue.db")
    try:
        store.insert_batch([record(str(i)) for i in range(100)], [OFF] * 100)
        store.mark_confirmed(range(1, 61))
        store.mark_sent(range(61, 71))
        store.mark_failed(71, "bad")
        store.purge([RowState.CONFIRMED])  # leaves a gap below the first live id
        stats = store.stats()
        expected = _whole_table_counts(store.path)
        by_name = {RowState(state).name.lower(): count for state, count in expected.items()}
        assert {name: count for name, count in stats["states"].items() if count} == by_name
        assert stats["pending"] == 39 and sum(stats["states"].values()) == 40
        assert stats["channels"]["adt"]["pending"] == 39
    finally:
        store.close()


def test_an_empty_queue_counts_zero(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue.db")
    try:
        assert sum(store.stats()["states"].values()) == 0
    finally:
        store.close()


def test_the_writer_caps_the_wal_file_and_keeps_temp_data_in_memory(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue.db")
    try:
        limit = store._conn.execute("PRAGMA journal_size_limit").fetchone()[0]
        assert limit == WAL_SIZE_LIMIT_BYTES > 16 * 1024 * 1024  # above the RESTART threshold
        # no temp files: freeing one waited for the disk's discard at the size cap (temp_store 2 = MEMORY)
        assert store._conn.execute("PRAGMA temp_store").fetchone()[0] == 2
    finally:
        store.close()
