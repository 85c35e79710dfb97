"""QueueStore: schema and migrations, group insert, de-duplication, storage errors, state
changes, lease, retention and stats, on real SQLite files in tmp_path."""

from __future__ import annotations

import itertools
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medagent.queue.records import DuplicatePolicy, InboundRecord, RowState
from medagent.queue.store import (
    SCHEMA_VERSION,
    QueueError,
    QueueLocked,
    QueueStore,
    SchemaTooNew,
    id_runs,
)

OFF, FLAG, DROP = DuplicatePolicy.OFF, DuplicatePolicy.FLAG, DuplicatePolicy.DROP


def record(control_id: str, *, channel: str = "adt", sender: str = "LAB^NORTH", body: bytes | None = None,
           received_at: float | None = None) -> InboundRecord:
    return InboundRecord(
        channel=channel, remote="127.0.0.1:40000", sender=sender, control_id=control_id,
        message_type="ADT^A01", body=body if body is not None else b"MSH|^~\\&|" + control_id.encode(),
        received_at=time.time() if received_at is None else received_at,
    )


@pytest.fixture
def store(tmp_path: Path):
    s = QueueStore(tmp_path / "queue.sqlite3")
    yield s
    s.close()


def states(path: Path) -> dict[int, int]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT id, state FROM messages"))


def age_rows(path: Path, seconds: float) -> None:
    """Make every row look `seconds` older (as if settled/received that long ago)."""
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE messages SET updated_at = updated_at - ?, received_at = received_at - ?", (seconds, seconds))


# ---------------------------------------------------------------- schema


def test_new_database_is_wal_with_current_schema_and_stable_uuid(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    first = QueueStore(path)
    uuid = first.queue_uuid
    assert first.schema_version == SCHEMA_VERSION
    first.close()
    second = QueueStore(path)
    assert second.queue_uuid == uuid and len(uuid) == 32
    second.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_database_from_newer_code_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    QueueStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew, match="upgrade medagent"):
        QueueStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


def test_missing_database_without_create_and_garbage_file_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(QueueError, match="no queue database"):
        QueueStore(tmp_path / "absent.sqlite3", create=False)
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(QueueError, match="cannot open queue database"):
        QueueStore(junk)


# ---------------------------------------------------------------- intake


def test_insert_batch_assigns_increasing_ids_and_load_pending_is_fifo(store: QueueStore) -> None:
    results = store.insert_batch([record(str(i)) for i in range(10)], [OFF] * 10)
    assert [r.row_id for r in results] == list(range(1, 11))
    assert all(r.ok and r.duplicate_of is None for r in results)
    more = store.insert_batch([record("x", channel="lab")], [OFF])
    assert more[0].row_id == 11
    page = store.load_pending(0, 4)
    assert [m.row_id for m in page] == [1, 2, 3, 4]
    rest = store.load_pending(4, 100)
    assert [m.row_id for m in rest] == list(range(5, 12))
    assert rest[-1].channel == "lab" and rest[-1].body == b"MSH|^~\\&|x" and rest[-1].attempts == 0
    assert store.insert_batch([], []) == []


def test_ids_are_never_reused_after_the_newest_rows_are_deleted(store: QueueStore) -> None:
    store.insert_batch([record(str(i)) for i in range(3)], [OFF] * 3)
    store.mark_confirmed([1, 2, 3])
    assert store.purge([RowState.CONFIRMED]) == 3
    assert store.insert_batch([record("new")], [OFF])[0].row_id == 4


def test_dedup_flag_and_drop_inside_the_window(store: QueueStore) -> None:
    first = store.insert_batch([record("A1")], [FLAG])[0]
    results = store.insert_batch(
        [record("A1"), record("A1"), record("B1"), record("B1"), record("B1")], [FLAG, DROP, OFF, DROP, FLAG]
    )
    assert results[0].row_id == 2 and results[0].duplicate_of == first.row_id
    assert results[1].row_id is None and results[1].duplicate_of == first.row_id and results[1].dropped
    b1 = results[2].row_id
    assert b1 == 3 and results[2].duplicate_of is None  # OFF: no lookup
    assert results[3].dropped and results[3].duplicate_of == b1  # in-batch repeat of an OFF row
    assert results[4].row_id == 4 and results[4].duplicate_of == b1
    assert [m.row_id for m in store.load_pending(0, 100)] == [1, 2, 3, 4]


def test_dedup_key_is_channel_sender_and_control_id(store: QueueStore) -> None:
    store.insert_batch([record("C1")], [FLAG])
    others = store.insert_batch(
        [record("C1", channel="lab"), record("C1", sender="OTHER^APP"), record("C2")], [DROP] * 3
    )
    assert [r.row_id for r in others] == [2, 3, 4] and all(r.duplicate_of is None for r in others)


def test_dedup_ignores_rows_outside_the_window_failed_rows_and_empty_control_ids(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue.sqlite3", dedup_window_s=60.0)
    try:
        now = time.time()
        store.insert_batch([record("OLD", received_at=now - 120), record("GONE"), record("")], [FLAG] * 3)
        store.mark_failed(2, "hub rejected")
        results = store.insert_batch(
            [record("OLD", received_at=now), record("GONE"), record(""), record("")], [DROP] * 4
        )
        assert all(r.row_id is not None and r.duplicate_of is None for r in results)
    finally:
        store.close()


def test_many_records_in_one_batch_with_repeats_across_lookup_chunks(store: QueueStore) -> None:
    keys = [str(i % 400) for i in range(1000)]
    results = store.insert_batch([record(k) for k in keys], [FLAG] * 1000)
    assert [r.row_id for r in results] == list(range(1, 1001))
    assert [r.duplicate_of for r in results[:400]] == [None] * 400
    assert [r.duplicate_of for r in results[400:]] == [int(k) + 1 for k in keys[400:]]


def test_disk_full_rolls_back_the_whole_batch_and_reports_every_record(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    store = QueueStore(path, max_db_mb=0.25)
    try:
        kept = store.insert_batch([record("ok", body=b"x" * 1000)], [FLAG])
        assert kept[0].ok
        failed = []
        for attempt in range(100):  # bounded: 0.25 MB fills after a handful of 40 KB batches
            results = store.insert_batch([record(f"{attempt}-{i}", body=b"y" * 4000) for i in range(10)], [FLAG] * 10)
            if not results[0].ok:
                failed = results
                break
        assert failed, "the size cap was never reached"
        assert all(r.error is not None and r.error.startswith("storage error:") for r in failed)
        assert all(r.row_id is None for r in failed)
        assert "full" in failed[0].error
        pending = store.load_pending(0, 10_000)
        assert len(pending) % 10 == 1  # only whole batches were kept
        assert store.insert_batch([record("small", body=b"z")], [OFF])[0].ok  # the connection still works
    finally:
        store.close()


# ---------------------------------------------------------------- state changes


def test_state_changes(store: QueueStore) -> None:
    path = store.path
    store.insert_batch([record(str(i)) for i in range(6)], [OFF] * 6)
    assert store.mark_sent([1, 2, 3]) == 3
    assert store.requeue([2]) == 1
    assert store.mark_confirmed([3, 4]) == 2
    assert store.mark_failed(5, "hub said no") == 1
    assert store.mark_failed(4, "too late") == 0  # settled rows are not failed
    assert store.increment_attempts([1, 1, 6]) == 3
    assert states(path) == {1: 1, 2: 0, 3: 2, 4: 2, 5: 3, 6: 0}
    assert store.requeue_sent() == 1
    pending = store.load_pending(0, 100)
    assert [(m.row_id, m.attempts) for m in pending] == [(1, 2), (2, 0), (6, 1)]
    failed = store.list_failed()
    assert [f["id"] for f in failed] == [5] and failed[0]["last_error"] == "hub said no"
    assert "body" not in failed[0] and failed[0]["size"] > 0 and failed[0]["state"] == "failed"
    generation = store.requeue_generation()
    assert store.retry_failed() == 1
    assert store.requeue_generation() == generation + 1
    assert store.first_pending_id() == 1


@pytest.mark.parametrize(("ids", "runs"), [
    ([], []),
    ([5], [(5, 5)]),
    ([7, 3, 4, 5, 9, 8, 4], [(3, 5), (7, 9)]),
    ([1, 3, 5], [(1, 1), (3, 3), (5, 5)]),
])
def test_id_runs_groups_consecutive_ids(ids: list[int], runs: list[tuple[int, int]]) -> None:
    assert id_runs(ids) == runs


@given(st.lists(st.integers(min_value=1, max_value=200), max_size=60))
def test_id_runs_cover_exactly_the_given_ids(ids: list[int]) -> None:
    runs = id_runs(ids)
    assert [i for first, last in runs for i in range(first, last + 1)] == sorted(set(ids))
    assert all(later[0] > earlier[1] + 1 for earlier, later in itertools.pairwise(runs))  # maximal runs


def test_cumulative_confirmation_settles_exactly_the_listed_rows(store: QueueStore) -> None:
    """Confirmations are written one statement per run of ids: the gaps between runs stay pending."""
    store.insert_batch([record(str(i)) for i in range(12)], [OFF] * 12)
    assert store.mark_failed(6, "refused") == 1
    assert store.mark_confirmed([2, 3, 4, 6, 9, 10, 12, 3]) == 7  # 3 twice; 6 FAILED -> CONFIRMED
    pending = [1, 5, 7, 8, 11]
    assert {i for i, state in states(store.path).items() if state == RowState.CONFIRMED} == {2, 3, 4, 6, 9, 10, 12}
    assert [m.row_id for m in store.load_pending(0, 100)] == pending
    assert store.mark_confirmed([9, 10]) == 0  # already confirmed: nothing changes
    # the same rule inside the insert transaction (confirmations riding along with a group)
    results = store.insert_batch([record("n")], [OFF], confirm_ids=[7, 8, 11])
    assert results[0].row_id == 13
    assert [m.row_id for m in store.load_pending(0, 100)] == [1, 5, 13]


def test_a_group_of_one_gets_the_next_id_even_after_the_newest_was_deleted(store: QueueStore) -> None:
    """One record per group (a lock-step sender) is one autocommit INSERT; ids are never reused."""
    assert [store.insert_batch([record(f"s{i}")], [FLAG])[0].row_id for i in range(3)] == [1, 2, 3]
    store.mark_confirmed([3])
    assert store.purge([RowState.CONFIRMED]) == 1
    again = store.insert_batch([record("s0")], [FLAG])[0]  # a resend of row 1, after the newest was deleted
    assert again.row_id == 4 and again.duplicate_of == 1 and again.ok
    dropped = store.insert_batch([record("s1")], [DROP])[0]
    assert dropped.row_id is None and dropped.duplicate_of == 2
    reused = store.insert_batch([record("s1", body=b"MSH|^~\\&|other")], [FLAG])[0]
    assert reused.row_id == 5 and reused.control_id_reused and reused.duplicate_of is None
    assert store.insert_batch([record(str(i)) for i in range(2)], [OFF] * 2)[1].row_id == 7


def test_purge_refuses_pending_rows(store: QueueStore) -> None:
    store.insert_batch([record("p")], [OFF])
    with pytest.raises(QueueError, match="not delivered"):
        store.purge([RowState.RECEIVED])
    assert store.purge([RowState.CONFIRMED, RowState.FAILED]) == 0


# ---------------------------------------------------------------- lease


def test_second_holder_is_locked_out_until_release_or_expiry(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    a, b = QueueStore(path), QueueStore(path)
    try:
        a.acquire_lease("agent-a", ttl_s=60)
        a.renew_lease("agent-a", ttl_s=60)
        with pytest.raises(QueueLocked, match=r"agent-a.*pid \d+"):
            b.acquire_lease("agent-b", ttl_s=60)
        a.release_lease("agent-a")
        b.acquire_lease("agent-b", ttl_s=0.01)
        time.sleep(0.05)
        a.acquire_lease("agent-a", ttl_s=60)  # b's lease expired
        with pytest.raises(QueueLocked):
            b.renew_lease("agent-b", ttl_s=60)  # b lost it
        assert a.lease_info()["holder"] == "agent-a"
    finally:
        a.close()
        b.close()


def test_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    script = (
        "import sys; from medagent.queue.store import QueueStore;"
        "s = QueueStore(sys.argv[1]); s.acquire_lease('crashed', 3600); print(s.lease_info()['pid'])"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    store = QueueStore(path)
    try:
        assert store.lease_info()["holder"] == "crashed"
        store.acquire_lease("successor", ttl_s=60)
        assert store.lease_info()["holder"] == "successor"
    finally:
        store.close()


# ---------------------------------------------------------------- retention and stats


def test_sweep_deletes_old_confirmed_and_failed_but_never_pending(store: QueueStore) -> None:
    store.insert_batch([record(str(i)) for i in range(8)], [OFF] * 8)
    store.mark_confirmed([1, 2, 3])
    store.mark_failed(4, "bad")
    store.mark_sent([5])
    age_rows(store.path, 10 * 86400)
    store.mark_confirmed([6])  # settled just now: kept
    assert store.sweep(retention_days=7, retention_max_mb=512, failed_retention_days=90) == 3
    assert store.sweep(retention_days=7, retention_max_mb=512, failed_retention_days=5) == 1
    assert sorted(states(store.path)) == [5, 6, 7, 8]


def test_sweep_trims_oldest_confirmed_rows_to_the_size_cap(store: QueueStore) -> None:
    body = b"b" * 4000
    for batch in range(10):
        store.insert_batch([record(f"{batch}-{i}", body=body) for i in range(50)], [OFF] * 50)
    store.mark_confirmed(range(1, 451))  # rows 451..500 stay pending
    assert store.used_bytes() > 1.5 * 1024 * 1024
    deleted = store.sweep(retention_days=7, retention_max_mb=0.5, failed_retention_days=90)
    remaining = states(store.path)
    assert deleted > 0 and store.used_bytes() <= 0.5 * 1024 * 1024
    assert all(row_id in remaining for row_id in range(451, 501))
    confirmed_left = sorted(i for i, s in remaining.items() if s == RowState.CONFIRMED)
    assert confirmed_left == list(range(451 - len(confirmed_left), 451))  # the oldest went first
    store.sweep(retention_days=7, retention_max_mb=0.0, failed_retention_days=90)
    assert sorted(states(store.path)) == list(range(451, 501))  # pending rows survive any cap


def test_sweep_with_max_rows_works_in_slices(store: QueueStore) -> None:
    store.insert_batch([record(str(i)) for i in range(25)], [OFF] * 25)
    store.mark_confirmed(range(1, 26))
    age_rows(store.path, 30 * 86400)
    slices = [store.sweep(7, 512, 90, chunk_rows=4, max_rows=10) for _ in range(4)]
    assert slices == [10, 10, 5, 0]


def test_stats(store: QueueStore) -> None:
    store.insert_batch([record("1"), record("2", channel="lab"), record("3", channel="lab")], [OFF] * 3)
    store.mark_confirmed([1])
    stats = store.stats()
    assert stats["states"] == {"received": 2, "sent": 0, "confirmed": 1, "failed": 0}
    assert stats["pending"] == 2 and list(stats["channels"]) == ["lab"]
    assert stats["channels"]["lab"]["pending"] == 2 and stats["channels"]["lab"]["oldest_pending_age_s"] >= 0
    assert stats["db_size_bytes"] > 0 and stats["db_used_bytes"] > 0
    assert stats["queue_uuid"] == store.queue_uuid and stats["schema_version"] == SCHEMA_VERSION
