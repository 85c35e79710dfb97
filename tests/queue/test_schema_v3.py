"""Schema 3 (issue 19): no AUTOINCREMENT and no partial pending index. What replaces them must hold:
ids are never reused (the id high-water), pending scans never miss a row (the pending floor), and
a version-2 database upgrades with every row, state and file payload intact."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medagent.queue import store as store_module
from medagent.queue.records import DuplicatePolicy, FilePayload, InboundRecord, RowState
from medagent.queue.store import MIGRATIONS, SCHEMA_VERSION, QueueError, QueueStore

OFF, FLAG = DuplicatePolicy.OFF, DuplicatePolicy.FLAG
_V2_INSERT = (
    "INSERT INTO messages (channel, remote, sender, control_id, message_type, content_type, body, received_at,"
    " state, attempts, duplicate_of, last_error, updated_at, file_path, file_size, file_sha256)"
    " VALUES ('adt', 'r', 'LAB^NORTH', ?, 'ADT^A01', 'x', ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?)"
)


def record(control_id: str, body: bytes | None = None, file: FilePayload | None = None) -> InboundRecord:
    return InboundRecord(
        channel="adt", remote="127.0.0.1:40000", sender="LAB^NORTH", control_id=control_id,
        message_type="ADT^A01", body=body if body is not None else b"MSH|^~\\&|" + control_id.encode(),
        received_at=time.time(), file=file,
    )


def write_v2_database(path: Path, rows: list[tuple[str, bytes, int, str | None]], spool: bytes | None = None) -> None:
    """A version-2 queue as the previous medagent wrote it: AUTOINCREMENT, the partial pending
    index, rows (control_id, body, state, file name or None), then its newest row deleted."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for statements in MIGRATIONS[:2]:
        for statement in statements:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    now = time.time()
    for control_id, body, state, file_name in rows:
        file_columns: tuple[object, ...] = (None, None, None)
        if file_name is not None:
            assert spool is not None
            file_columns = (f"spool/pacs/{file_name}", len(spool), hashlib.sha256(spool).hexdigest())
        last_error = "refused" if state == RowState.FAILED else None
        conn.execute(_V2_INSERT, (control_id, body, now, int(state), 2, last_error, now, *file_columns))
    conn.execute("DELETE FROM messages WHERE id = (SELECT max(id) FROM messages)")
    conn.close()


def columns(path: Path) -> dict[int, tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return {row[0]: row[1:] for row in conn.execute(
            "SELECT id, channel, remote, sender, control_id, message_type, content_type, body, received_at, state,"
            " attempts, duplicate_of, last_error, updated_at, file_path, file_size, file_sha256 FROM messages")}


def test_a_version_2_database_upgrades_with_every_row_state_and_file(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    (tmp_path / "spool" / "pacs").mkdir(parents=True)
    image = b"DICM" * 1000
    (tmp_path / "spool" / "pacs" / "a.dcm").write_bytes(image)
    write_v2_database(path, [
        ("C1", b"confirmed", RowState.CONFIRMED, None),
        ("R1", b"received", RowState.RECEIVED, None),
        ("F1", b"failed", RowState.FAILED, None),
        ("S1", b"{}", RowState.SENT, "a.dcm"),
        ("C2", b"confirmed too", RowState.CONFIRMED, None),
        ("R2", b"the newest, deleted", RowState.RECEIVED, None),  # id 6: deleted by write_v2_database
    ], spool=image)
    before = columns(path)
    store = QueueStore(path)
    try:
        assert store.schema_version == SCHEMA_VERSION == 3
        with sqlite3.connect(path) as conn:
            table_sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
            indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'"
                                                  " AND tbl_name = 'messages'")}
            sequence = conn.execute("SELECT count(*) FROM sqlite_sequence WHERE name = 'messages'").fetchone()[0]
        assert "AUTOINCREMENT" not in table_sql.upper() and sequence == 0
        assert indexes == {"messages_dedup"}
        assert columns(path) == before  # every column of every row, ids included
        pending = store.load_pending(0, 10)
        assert [(m.row_id, m.control_id) for m in pending] == [(2, "R1"), (4, "S1")]
        assert pending[1].file is not None and pending[1].file.size == len(image)
        assert store.first_pending_id() == 2
        assert store.list_failed()[0]["id"] == 3
        assert store.stats()["states"] == {"received": 1, "sent": 1, "confirmed": 2, "failed": 1}
        resend, new = store.insert_batch([record("C2", b"confirmed too"), record("N1")], [FLAG, FLAG])
        assert resend.duplicate_of == 5 and new.row_id == 8  # 6 was handed out before the upgrade
        lone = store.insert_batch([record("R1", b"received")], [FLAG])[0]
        assert lone.row_id == 9 and lone.duplicate_of == 2
        assert store.requeue_sent() == 1 and store.retry_failed() == 1
        assert [m.row_id for m in store.load_pending(0, 10)] == [2, 3, 4, 7, 8, 9]
    finally:
        store.close()


def test_a_large_upgrade_logs_its_row_count_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "queue.sqlite3"
    write_v2_database(path, [(f"C{i}", b"x", RowState.CONFIRMED, None) for i in range(6)])
    monkeypatch.setattr(store_module, "_REBUILD_LOG_ROWS", 5)
    with caplog.at_level(logging.WARNING, logger="medagent.queue.store"):
        QueueStore(path).close()
    assert [r.getMessage() for r in caplog.records if "rebuilds" in r.getMessage()] == [
        (f"queue {path}: upgrading schema 2 -> 3 rebuilds 5 rows; this takes a few seconds per million rows"
         " and needs free disk space about the database's size")]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medagent.queue.store"):
        QueueStore(path).close()  # already upgraded: nothing to say
    assert not caplog.records


def test_an_upgrade_without_room_fails_clearly_and_leaves_version_2(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    write_v2_database(path, [(f"C{i}", b"B" * 2000, RowState.CONFIRMED, None) for i in range(200)])
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages, page_size = conn.execute("PRAGMA page_count").fetchone()[0], conn.execute("PRAGMA page_size").fetchone()[0]
    before = columns(path)
    with pytest.raises(QueueError, match=r"cannot upgrade queue database .* from schema 2 to 3 \(storage error: "
                                         r"database or disk is full\); it was left unchanged: free disk space"):
        QueueStore(path, max_db_mb=(pages + 5) * page_size / (1024 * 1024))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert columns(path) == before
    QueueStore(path).close()  # with room it upgrades


def test_ids_are_never_reused_after_every_row_is_deleted_and_the_store_reopened(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    store = QueueStore(path)
    try:
        ids = [r.row_id for r in store.insert_batch([record(str(i)) for i in range(5)], [OFF] * 5)]
        ids.append(store.insert_batch([record("lone")], [OFF])[0].row_id)
        assert ids == [1, 2, 3, 4, 5, 6]
        store.mark_confirmed(ids)
        assert store.purge([RowState.CONFIRMED]) == 6  # the newest row too
        assert store.insert_batch([record("after")], [OFF])[0].row_id == 7  # same process: the counter
        store.mark_confirmed([7])
        assert store.purge([RowState.CONFIRMED]) == 1
    finally:
        store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    again = QueueStore(path)
    try:
        assert again.insert_batch([record("new")], [OFF])[0].row_id == 8  # above every id ever handed out
        assert [r.row_id for r in again.insert_batch([record("a"), record("b")], [OFF] * 2)] == [9, 10]
    finally:
        again.close()


def test_an_id_taken_behind_the_stores_back_is_an_error_once_then_skipped(tmp_path: Path) -> None:
    """Two writers without the lease (a bug elsewhere): the second one's insert fails instead of
    overwriting, and its next insert takes an id above the other's."""
    path = tmp_path / "queue.sqlite3"
    first, second = QueueStore(path), QueueStore(path)
    try:
        assert first.insert_batch([record("a")], [OFF])[0].row_id == 1
        clash = second.insert_batch([record("b")], [OFF])[0]
        assert clash.row_id is None and "UNIQUE" in (clash.error or "")
        assert second.insert_batch([record("b")], [OFF])[0].row_id == 2
    finally:
        first.close()
        second.close()


def test_pending_scans_see_a_row_another_process_retried_below_the_floor(tmp_path: Path) -> None:
    """The agent's floor has moved past a FAILED row; an admin command retries it. The agent sees
    it once it reads the new requeue generation, and no saved floor hides it from a later store,
    even when the agent saves its own (higher) floor after the retry."""
    path = tmp_path / "queue.sqlite3"
    agent = QueueStore(path)
    try:
        agent.insert_batch([record(str(i)) for i in range(10)], [OFF] * 10)
        agent.mark_failed(2, "refused")
        agent.mark_confirmed([1, *range(3, 10)])
        assert agent.first_pending_id() == 10  # the floor is now 10
        agent.mark_confirmed([10])
        assert agent.first_pending_id() is None
        admin = QueueStore(path, create=False)
        try:
            assert admin.retry_failed([2]) == 1
        finally:
            admin.close()
        generation = agent.requeue_generation()
        assert generation == 1
        assert agent.first_pending_id() == 2
        assert [m.row_id for m in agent.load_pending(0, 10)] == [2]
        assert agent.stats()["pending"] == 1 and agent.stats()["channels"]["adt"]["pending"] == 1
        # the agent saves its floor in a delete transaction after another retry it has not read yet
        agent.mark_failed(2, "refused again")
        assert agent.first_pending_id() is None
        admin = QueueStore(path, create=False)
        try:
            assert admin.retry_failed() == 1
        finally:
            admin.close()
        assert agent.purge([RowState.CONFIRMED]) == 9
    finally:
        agent.close()
    later = QueueStore(path)
    try:
        assert later.first_pending_id() == 2
        assert [m.row_id for m in later.load_pending(0, 10)] == [2]
    finally:
        later.close()


def test_the_floor_saved_at_lease_release_is_where_the_next_holder_starts(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    store = QueueStore(path)
    try:
        store.acquire_lease("a", 60)
        store.insert_batch([record(str(i)) for i in range(6)], [OFF] * 6)
        store.mark_confirmed([1, 2, 3, 4])
        assert [m.row_id for m in store.load_pending(0, 10)] == [5, 6]
        store.release_lease("a")
    finally:
        store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'pending_floor'").fetchone()[0] == "5"
        conn.execute("UPDATE messages SET state = 0 WHERE id = 1")  # not a path the store offers
    later = QueueStore(path)
    try:  # the saved floor is trusted: a row changed by hand below it is not scanned for
        assert later.first_pending_id() == 5
    finally:
        later.close()


_KEYS = st.sampled_from(["A", "B", ""])
_BODIES = st.sampled_from([b"one", b"two"])
_POLICIES = st.sampled_from([OFF, FLAG, DuplicatePolicy.DROP])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(_KEYS, _BODIES, _POLICIES, st.integers(0, 3), st.booleans()), min_size=1, max_size=14))
def test_a_lone_record_is_deduplicated_exactly_as_in_a_group(tmp_path_factory: pytest.TempPathFactory,
                                                              steps: list[tuple[str, bytes, DuplicatePolicy, int, bool]]) -> None:
    """A lone record (autocommit lookup, then autocommit INSERT) against the group path (one
    transaction; a confirmation riding along forces it): same ids, duplicates, reused flags, on
    the same history of resends, reused ids, rows FAILED in between and rows outside the window."""
    directory = tmp_path_factory.mktemp("lone")
    lone, grouped = QueueStore(directory / "lone.sqlite3", dedup_window_s=60), QueueStore(directory / "group.sqlite3", dedup_window_s=60)
    try:
        start = time.time()
        for step, (control_id, body, policy, age_minutes, fail_it) in enumerate(steps):
            item = InboundRecord("adt", "r", "LAB^NORTH", control_id, "ADT^A01", body, start - 50 * age_minutes + step)
            got = lone.insert_batch([item], [policy])[0]
            want = grouped.insert_batch([item], [policy], confirm_ids=[10**9])[0]
            assert got == want
            if fail_it and got.row_id is not None:
                lone.mark_failed(got.row_id, "x")
                grouped.mark_failed(want.row_id, "x")
    finally:
        lone.close()
        grouped.close()
