"""The pending map (issue 19, Q2): a superset of the pending ids as runs plus an open tail.

What must hold: pending scans through the map never miss a row (randomized against the table
itself, across reopen, crash and retries from another process), and one old pending row no
longer makes a load from below it walk the settled rows after it (counted in SQLite VM steps,
not timed)."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

import pytest

from medagent.queue.pending_map import MAX_RUNS, PendingMap, decode_runs, encode_runs, id_runs
from medagent.queue.records import DuplicatePolicy, InboundRecord, RowState
from medagent.queue.store import QueueStore

OFF = DuplicatePolicy.OFF


def record(control_id: str) -> InboundRecord:
    return InboundRecord(channel="adt", remote="127.0.0.1:40000", sender="LAB^NORTH", control_id=control_id,
                         message_type="ADT^A01", body=b"MSH|^~\\&|" + control_id.encode(), received_at=time.time())


def covered(pending: PendingMap, ids: range) -> set[int]:
    return {i for i in ids if i >= pending.tail or any(a <= i <= b for a, b in pending.runs)}


# ----------------------------------------------------------------- the map alone


def test_in_order_confirmations_only_move_the_tail() -> None:
    pending = PendingMap(1)
    pending.settle(1, 100, newest=150)
    pending.settle(101, 150, newest=150)
    assert (pending.runs, pending.tail, pending.floor) == ([], 151, 151)


def test_a_row_left_behind_becomes_a_run_and_leaves_it_when_settled() -> None:
    pending = PendingMap(1)
    pending.settle(2, 1000, newest=1000)
    assert (pending.runs, pending.tail, pending.floor) == ([(1, 1)], 1001, 1)
    pending.settle(1, 1, newest=1000)
    assert (pending.runs, pending.floor) == ([], 1001)


def test_the_tail_never_passes_the_newest_id() -> None:
    pending = PendingMap(1)
    pending.settle(1, 50, newest=10)  # ids 11..50 were never handed out: later rows get them
    assert pending.tail == 11


def test_settle_splits_runs_and_add_merges_them() -> None:
    pending = PendingMap(1)
    pending.settle(21, 30, newest=30)
    pending.settle(5, 7, newest=30)
    assert pending.runs == [(1, 4), (8, 20)]
    pending.add([(6, 6), (25, 40)])  # ids at or above the tail are covered already
    assert (pending.runs, pending.tail) == ([(1, 4), (6, 6), (8, 20), (25, 30)], 31)
    pending.add([(7, 7)])
    assert pending.runs == [(1, 4), (6, 20), (25, 30)]


def test_learn_keeps_only_what_a_walk_found_and_lower_floor_forgets_the_runs_above() -> None:
    pending = PendingMap(1)
    pending.settle(101, 200, newest=200)
    pending.learn(1, 100, [3, 4, 90])
    assert pending.runs == [(3, 4), (90, 90)]
    pending.lower_floor(50)
    assert (pending.runs, pending.tail) == ([(3, 4)], 50)


def test_spans_clip_to_the_requested_ids() -> None:
    pending = PendingMap(100, [(3, 4), (10, 20)])
    assert list(pending.spans(0, None)) == [(3, 4, False), (10, 20, False), (100, None, True)]
    assert list(pending.spans(12, 50)) == [(13, 20, False)]
    assert list(pending.spans(150, 200)) == [(151, 200, True)]


def test_coarsening_keeps_a_superset() -> None:
    pending = PendingMap(1)
    for first in range(2, 2 * (MAX_RUNS + 10), 2):  # every other id left behind
        pending.settle(first, first, newest=10**6)
    assert len(pending.runs) <= MAX_RUNS
    assert covered(pending, range(1, 2 * (MAX_RUNS + 10), 2)) == set(range(1, 2 * (MAX_RUNS + 10), 2))


def test_encode_round_trip_and_bad_text() -> None:
    pending = PendingMap(77, [(1, 1), (5, 9)])
    decoded = PendingMap.decode(pending.encode() or "")
    assert (decoded.runs, decoded.tail) == ([(1, 1), (5, 9)], 77)
    assert encode_runs([(i, i) for i in range(0, 1000, 2)]) is None  # too many runs to save
    for bad in ("5-3", "x-1", "7", "0-2"):
        with pytest.raises(ValueError):
            decode_runs(bad)
    with pytest.raises(ValueError):
        PendingMap.decode("12")
    assert id_runs([7, 3, 4, 5, 9, 8, 4]) == [(3, 5), (7, 9)]


# ----------------------------------------------------------------- the store


def truth(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute(f"SELECT id FROM messages WHERE state < {int(RowState.CONFIRMED)} ORDER BY id")]


def check(store: QueueStore, path: Path, rng: random.Random) -> None:
    expected = truth(path)
    assert [m.row_id for m in store.load_pending(0, 10**6)] == expected
    assert store.first_pending_id() == (expected[0] if expected else None)
    after = rng.randint(0, (expected[-1] if expected else 0) + 2)
    page = [m.row_id for m in store.load_pending(after, 3)]
    assert page == [i for i in expected if i > after][:3]


@pytest.mark.parametrize("seed", range(12))
def test_pending_scans_never_miss_a_row_on_random_histories(tmp_path: Path, seed: int) -> None:
    """Inserts, in-order and out-of-order confirmations, sends, requeues, failures, retries by
    this store and by another process, reopen after a clean release and after a crash: after
    every step the store's scans return exactly the table's pending rows."""
    rng = random.Random(seed)
    path = tmp_path / "queue.sqlite3"
    store = QueueStore(path)
    store.acquire_lease("agent", 60)
    counter = 0
    try:
        for _step in range(120):
            ids = truth(path)
            newest = store._last_id
            action = rng.random()
            if action < 0.3:
                count = rng.randint(1, 6)
                confirm = rng.sample(ids, min(len(ids), rng.randint(0, 3))) if rng.random() < 0.5 else []
                records = [record(str(counter + i)) for i in range(count)]
                counter += count
                store.insert_batch(records, [OFF] * count, confirm_ids=confirm)
            elif action < 0.5 and newest:
                first = rng.randint(1, newest)
                store.mark_confirmed(range(first, min(newest, first + rng.randint(0, 8)) + 1))
            elif action < 0.58 and ids:
                store.mark_sent(rng.sample(ids, min(3, len(ids))))
            elif action < 0.62:
                store.requeue_sent() if rng.random() < 0.5 else store.requeue(ids[:2])
            elif action < 0.72 and ids:
                store.mark_failed(rng.choice(ids), "refused")
            elif action < 0.8:
                if rng.random() < 0.5:
                    store.retry_failed(None if rng.random() < 0.5 else [rng.randint(1, newest + 1)])
                else:
                    admin = QueueStore(path, create=False)  # an operator's `queue retry`
                    try:
                        admin.retry_failed()
                    finally:
                        admin.close()
                    # the agent sees it by polling the generation, or first in a lease renewal
                    store.requeue_generation() if rng.random() < 0.5 else store.renew_lease("agent", 60)
            elif action < 0.86:
                if rng.random() < 0.5:  # a clean stop saves the map; else a crash after the last save
                    store.release_lease("agent")
                store.close()
                store = QueueStore(path)
                store.acquire_lease("agent", 60)
            elif action < 0.9:
                store.renew_lease("agent", 60)
            elif action < 0.95:
                store.purge([RowState.CONFIRMED])
            check(store, path, rng)
    finally:
        store.close()


def _vm_steps(store: QueueStore, call: object) -> int:
    """SQLite VM instructions (in thousands) the call ran: how many rows a walk visited."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    store._conn.set_progress_handler(count, 1000)
    try:
        call()  # type: ignore[operator]
    finally:
        store._conn.set_progress_handler(None, 0)
    return steps[0]


def build_stuck_queue(path: Path, settled: int) -> None:
    """Row 1 still pending (the hub keeps refusing it), `settled` rows after it confirmed, 3 pending."""
    store = QueueStore(path)
    try:
        store.acquire_lease("agent", 60)
        for start in range(0, settled + 4, 1000):
            count = min(1000, settled + 4 - start)
            store.insert_batch([record(str(start + i)) for i in range(count)], [OFF] * count)
        store.mark_confirmed(range(2, settled + 2))
        store.release_lease("agent")
    finally:
        store.close()


def test_a_load_from_below_an_old_pending_row_does_not_walk_the_settled_rows(tmp_path: Path) -> None:
    settled = 20_000
    path = tmp_path / "queue.sqlite3"
    build_stuck_queue(path, settled)
    store = QueueStore(path)
    try:
        full_walk = _vm_steps(store, lambda: store._conn.execute(
            "SELECT count(*) FROM messages WHERE id > 0 AND state < 2").fetchone())
        assert full_walk > 40  # the yardstick visits every row
        loaded: list[int] = []
        steps = _vm_steps(store, lambda: loaded.extend(m.row_id for m in store.load_pending(0, 1000)))
        assert loaded == [1, settled + 2, settled + 3, settled + 4]
        assert steps < full_walk / 10
        assert _vm_steps(store, store.first_pending_id) < full_walk / 10
    finally:
        store.close()
    admin = QueueStore(path, create=False)  # a retry from another process keeps the saved map usable
    try:
        admin.mark_failed(1, "refused")
        assert admin.retry_failed() == 1
    finally:
        admin.close()
    store = QueueStore(path)
    try:
        steps = _vm_steps(store, lambda: store.load_pending(0, 1000))
        assert steps < full_walk / 10
        assert [m.row_id for m in store.load_pending(0, 1000)] == [1, settled + 2, settled + 3, settled + 4]
    finally:
        store.close()


def test_without_a_saved_map_the_first_walk_pays_once_then_the_map_is_tight(tmp_path: Path) -> None:
    """A map saved by an older store, or a crash before the first save: the floor alone is
    trusted, so the first load walks from it, and remembers the old row as a run."""
    settled = 20_000
    path = tmp_path / "queue.sqlite3"
    build_stuck_queue(path, settled)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'pending_map'")
    store = QueueStore(path)
    try:
        assert [m.row_id for m in store.load_pending(0, 2)] == [1, settled + 2]
        assert store._pending.runs == [(1, 1), (settled + 2, settled + 2)]
        assert _vm_steps(store, lambda: store.load_pending(0, 1000)) < 10
    finally:
        store.close()
