"""QueueStore: dedup by content (issue 13, defect 3), file payload rows and their files, the
schema migration that added both, and private file modes (issue 18, defect 2). Real SQLite
files and real spool files in tmp_path."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from medagent.queue.records import DuplicatePolicy, FilePayload, InboundRecord, RowState
from medagent.queue.store import MIGRATIONS, SCHEMA_VERSION, QueueStore, content_key, spool_path_problem

OFF, FLAG, DROP = DuplicatePolicy.OFF, DuplicatePolicy.FLAG, DuplicatePolicy.DROP


def record(control_id: str, body: bytes, *, sender: str = "LAB^NORTH", file: FilePayload | None = None,
           received_at: float | None = None) -> InboundRecord:
    return InboundRecord(
        channel="adt", remote="127.0.0.1:40000", sender=sender, control_id=control_id, message_type="ADT^A01",
        body=body, received_at=time.time() if received_at is None else received_at, file=file,
    )


def spool_file(data_dir: Path, name: str, content: bytes, channel: str = "pacs") -> FilePayload:
    """A payload file as a channel writes it: below spool/<channel>, fsynced, 0600."""
    directory = data_dir / "spool" / channel
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(content)
    return FilePayload(f"spool/{channel}/{name}", len(content), hashlib.sha256(content).hexdigest())


@pytest.fixture
def store(tmp_path: Path):
    s = QueueStore(tmp_path / "queue.sqlite3")
    yield s
    s.close()


# ---------------------------------------------------------------- dedup by content


def test_a_reused_control_id_with_other_content_is_a_new_message(store: QueueStore) -> None:
    """Issue 13 defect 3: A, then B (another patient) with A's MSH-10: B is stored, not a duplicate."""
    a = store.insert_batch([record("MSG1", b"MSH|...|MSG1\rPID|||ALICE")], [DROP])[0]
    b = store.insert_batch([record("MSG1", b"MSH|...|MSG1\rPID|||BOB")], [DROP])[0]
    assert a.row_id == 1 and not a.control_id_reused
    assert b.row_id == 2 and b.duplicate_of is None and b.control_id_reused and b.ok
    assert [m.body for m in store.load_pending(0, 10)] == [b"MSH|...|MSG1\rPID|||ALICE", b"MSH|...|MSG1\rPID|||BOB"]


def test_exact_resends_keep_flag_and_drop_behaviour_next_to_a_reused_id(store: QueueStore) -> None:
    alice, bob = b"MSH|...|MSG1\rPID|||ALICE", b"MSH|...|MSG1\rPID|||BOB"
    results = store.insert_batch(
        [record("MSG1", alice), record("MSG1", bob), record("MSG1", bob), record("MSG1", alice), record("MSG1", bob)],
        [FLAG, FLAG, DROP, FLAG, OFF],
    )
    assert [(r.row_id, r.duplicate_of, r.control_id_reused) for r in results] == [
        (1, None, False),
        (2, None, True),  # other content: new message
        (None, 2, False),  # exact resend of B, dropped: points at B, not at A
        (3, 1, False),  # exact resend of A, flagged
        (4, None, False),  # OFF: no lookup at all
    ]


def test_reuse_is_judged_inside_the_window_only(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue.sqlite3", dedup_window_s=60.0)
    try:
        now = time.time()
        store.insert_batch([record("OLD", b"first", received_at=now - 120)], [FLAG])
        later = store.insert_batch([record("OLD", b"second", received_at=now)], [FLAG])[0]
        assert later.row_id == 2 and not later.control_id_reused and later.duplicate_of is None
    finally:
        store.close()


def test_file_payloads_dedup_on_the_file_digest_not_the_metadata(store: QueueStore, tmp_path: Path) -> None:
    one = spool_file(tmp_path, "a.dcm", b"DICM instance one")
    two = spool_file(tmp_path, "b.dcm", b"DICM instance two")
    again = spool_file(tmp_path, "c.dcm", b"DICM instance one")  # same content, another file
    meta = b'{"00080018":{"vr":"UI","Value":["1.2.3"]}}'
    results = store.insert_batch(
        [record("1.2.3", meta, file=one), record("1.2.3", meta, file=two), record("1.2.3", meta, file=again)],
        [FLAG] * 3,
    )
    assert [(r.row_id, r.duplicate_of, r.control_id_reused) for r in results] == [
        (1, None, False), (2, None, True), (3, 1, False)
    ]
    assert content_key(record("x", b"", file=one)) != content_key(record("x", one.sha256.encode()))
    inline = store.insert_batch([record("1.2.3", one.sha256.encode())], [FLAG])[0]  # body = the hex digest
    assert inline.duplicate_of is None and inline.control_id_reused


def test_rows_from_a_version_1_database_keep_their_dedup(tmp_path: Path) -> None:
    """Forward-only migrations 1 -> 2 -> 3: a version-1 database keeps its rows and its dedup."""
    path = tmp_path / "queue.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    now = time.time()
    conn.execute(
        "INSERT INTO messages (channel, remote, sender, control_id, message_type, content_type, body,"
        " received_at, updated_at) VALUES ('adt', 'r', 'LAB^NORTH', 'V1', 'ADT^A01', 'x', ?, ?, ?)",
        (b"old body", now, now),
    )
    conn.close()
    store = QueueStore(path)
    try:
        assert store.schema_version == SCHEMA_VERSION == 3
        resend, reused = store.insert_batch([record("V1", b"old body"), record("V1", b"new body")], [FLAG, FLAG])
        assert resend.duplicate_of == 1 and not resend.control_id_reused
        assert reused.duplicate_of is None and reused.control_id_reused
        old = store.load_pending(0, 1)[0]
        assert old.body == b"old body" and old.file is None
    finally:
        store.close()


# ---------------------------------------------------------------- file payloads


def test_file_payload_rows_round_trip_and_are_counted_in_stats(store: QueueStore, tmp_path: Path) -> None:
    payload = spool_file(tmp_path, "x.dcm", b"D" * 5000)
    store.insert_batch([record("F1", b"{}", file=payload), record("I1", b"inline")], [FLAG, FLAG])
    file_row, inline_row = store.load_pending(0, 10)
    assert file_row.file == payload and file_row.body == b"{}"
    assert inline_row.file is None
    stats = store.stats()
    assert stats["spool_files"] == 1 and stats["spool_bytes"] == 5000


@pytest.mark.parametrize("bad", [
    "/etc/passwd", "../queue.sqlite3", "spool/../queue.sqlite3", "spool/a/../../x", "other/x.dcm", "spool",
    "spool//x", "./spool/x", "spool\\x", "", "spool/x\x00",
])
def test_a_file_reference_outside_the_spool_is_refused_alone(store: QueueStore, tmp_path: Path, bad: str) -> None:
    assert spool_path_problem(bad) is not None
    good = spool_file(tmp_path, "ok.dcm", b"ok")
    results = store.insert_batch(
        [record("A", b"1"), record("B", b"{}", file=FilePayload(bad, 1, "00" * 32)), record("C", b"{}", file=good)],
        [FLAG] * 3,
    )
    assert results[0].ok and results[2].ok
    assert not results[1].ok and "invalid file payload path" in (results[1].error or "")
    assert [m.control_id for m in store.load_pending(0, 10)] == ["A", "C"]


def test_retention_and_purge_delete_the_files_of_deleted_rows_only(store: QueueStore, tmp_path: Path) -> None:
    files = [spool_file(tmp_path, f"{i}.dcm", bytes([i]) * 100) for i in range(4)]
    store.insert_batch([record(f"F{i}", b"{}", file=f) for i, f in enumerate(files)], [FLAG] * 4)
    store.mark_confirmed([1, 2])
    store.mark_failed(3, "rejected")
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE messages SET updated_at = updated_at - ? WHERE id = 1", (30 * 86400,))
    assert store.sweep(retention_days=7, retention_max_mb=512, failed_retention_days=90) == 1
    exists = [(tmp_path / f.path).exists() for f in files]
    assert exists == [False, True, True, True]
    assert store.purge([RowState.FAILED]) == 1
    assert [(tmp_path / f.path).exists() for f in files] == [False, True, False, True]
    assert store.stats()["spool_files"] == 2  # row 2 (confirmed, recent) and row 4 (pending)


def test_the_size_cap_counts_spool_bytes(store: QueueStore, tmp_path: Path) -> None:
    files = [spool_file(tmp_path, f"{i}.dcm", b"x" * 200_000) for i in range(6)]
    store.insert_batch([record(f"F{i}", b"{}", file=f) for i, f in enumerate(files)], [FLAG] * 6)
    store.mark_confirmed(range(1, 6))  # row 6 stays pending
    store.sweep(retention_days=7, retention_max_mb=0.5, failed_retention_days=90)
    left = [f for f in files if (tmp_path / f.path).exists()]
    assert files[5] in left and len(left) <= 3  # 0.5 MB holds at most two of the confirmed ones
    assert store.stats()["spool_bytes"] == 200_000 * len(left)


def test_orphan_sweep_removes_only_unreferenced_files_past_the_grace(store: QueueStore, tmp_path: Path) -> None:
    kept = spool_file(tmp_path, "kept.dcm", b"referenced")
    store.insert_batch([record("K", b"{}", file=kept)], [FLAG])
    old_orphan = spool_file(tmp_path, "crashed.dcm", b"row deleted, file not")
    fresh_orphan = spool_file(tmp_path, "writing.dcm", b"a channel is still writing this")
    outside = tmp_path / "not-spool.bin"
    outside.write_bytes(b"never touched")
    an_hour_ago = time.time() - 3600
    for path in (tmp_path / old_orphan.path, tmp_path / kept.path, outside):
        os.utime(path, (an_hour_ago, an_hour_ago))
    assert store.sweep_orphan_files(older_than_s=600) == (1, len(b"row deleted, file not"))
    assert not (tmp_path / old_orphan.path).exists()
    assert (tmp_path / kept.path).exists() and (tmp_path / fresh_orphan.path).exists() and outside.exists()
    assert store.sweep_orphan_files(older_than_s=0) == (1, len(b"a channel is still writing this"))
    assert (tmp_path / kept.path).exists()


# ---------------------------------------------------------------- private files


def test_database_directory_and_wal_are_private_under_umask_022(tmp_path: Path) -> None:
    """Issue 18 defect 2: with umask 022 the directory was 0755 and the files 0644."""
    data_dir = tmp_path / "a" / "medagent-data"
    old = os.umask(0o022)
    try:
        store = QueueStore(data_dir / "queue.sqlite3")
        store.insert_batch([record("P", b"PHI")], [FLAG])  # the WAL exists while the store is open
        modes = {name: stat.S_IMODE(os.stat(data_dir / name).st_mode)
                 for name in ("queue.sqlite3", "queue.sqlite3-wal", "queue.sqlite3-shm")}
        store.close()
    finally:
        os.umask(old)
    assert modes == {"queue.sqlite3": 0o600, "queue.sqlite3-wal": 0o600, "queue.sqlite3-shm": 0o600}
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(data_dir.parent.stat().st_mode) == 0o700  # created parents too


def test_an_existing_world_readable_queue_is_tightened(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    first = QueueStore(data_dir / "queue.sqlite3")
    first.close()
    for path in (data_dir / "queue.sqlite3",):
        os.chmod(path, 0o644)
    os.chmod(data_dir, 0o755)
    QueueStore(data_dir / "queue.sqlite3").close()
    assert stat.S_IMODE((data_dir / "queue.sqlite3").stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
