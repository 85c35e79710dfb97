"""Incremental retention (`QueueStore.sweep_slice`): a pass of bounded steps applies the same
rules as `sweep` (old CONFIRMED, size cap, old FAILED; never pending rows), each step deletes at
most `chunk_rows` rows and examines at most `scan_rows` ids, and the position survives between
steps. Real SQLite files in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_store import OFF, age_rows, record, states

from medagent.queue.records import RowState
from medagent.queue.store import QueueStore

MAX_STEPS = 10_000  # bound of every pass loop below


def run_pass(store: QueueStore, *rules: float, chunk_rows: int, scan_rows: int) -> list[int]:
    """Steps until the pass completes; the rows each step deleted."""
    steps = []
    for _ in range(MAX_STEPS):
        deleted, finished = store.sweep_slice(*rules, chunk_rows=chunk_rows, scan_rows=scan_rows)
        steps.append(deleted)
        if finished:
            return steps
    pytest.fail("the retention pass did not finish")


@pytest.fixture
def store(tmp_path: Path):
    opened = QueueStore(tmp_path / "queue.db")
    yield opened
    opened.close()


def test_a_pass_applies_the_age_rules_in_bounded_steps(store: QueueStore) -> None:
    store.insert_batch([record(str(i)) for i in range(60)], [OFF] * 60)
    store.mark_confirmed(range(1, 41))
    for row_id in range(41, 46):
        store.mark_failed(row_id, "bad")
    store.mark_sent([46])
    age_rows(store.path, 100 * 86400)
    store.mark_confirmed([47])  # settled just now: kept
    steps = run_pass(store, 7, 512, 90, chunk_rows=4, scan_rows=10)
    assert max(steps) <= 4 and sum(steps) == 45
    assert sorted(states(store.path)) == list(range(46, 61))
    assert run_pass(store, 7, 512, 90, chunk_rows=4, scan_rows=10)[-1] == 0  # a new pass finds nothing
    assert sum(run_pass(store, 7, 512, 90, chunk_rows=4, scan_rows=10)) == 0


def test_a_pass_starts_at_the_oldest_live_id(store: QueueStore) -> None:
    store.insert_batch([record(str(i)) for i in range(30)], [OFF] * 30)
    store.mark_confirmed(range(1, 31))
    age_rows(store.path, 30 * 86400)
    assert sum(run_pass(store, 7, 512, 90, chunk_rows=100, scan_rows=100)) == 30
    store.insert_batch([record(f"late-{i}") for i in range(3)], [OFF] * 3)  # ids 31..33
    store.mark_confirmed([31, 32, 33])
    age_rows(store.path, 30 * 86400)
    steps = run_pass(store, 7, 512, 90, chunk_rows=100, scan_rows=2)
    assert sum(steps) == 3 and len(steps) <= 6  # no walk from id 0 over the deleted range


def test_a_pass_trims_to_the_size_cap_oldest_first_and_keeps_pending_rows(store: QueueStore) -> None:
    body = b"b" * 4000
    for batch in range(10):
        store.insert_batch([record(f"{batch}-{i}", body=body) for i in range(50)], [OFF] * 50)
    store.mark_confirmed(range(1, 451))
    steps = run_pass(store, 7, 0.5, 90, chunk_rows=25, scan_rows=1000)
    assert max(steps) <= 25 and store.used_bytes() <= 0.5 * 1024 * 1024
    remaining = states(store.path)
    assert all(row_id in remaining for row_id in range(451, 501))
    confirmed_left = sorted(i for i, s in remaining.items() if s == RowState.CONFIRMED)
    assert confirmed_left == list(range(451 - len(confirmed_left), 451))
    run_pass(store, 7, 0.0, 90, chunk_rows=25, scan_rows=1000)
    assert sorted(states(store.path)) == list(range(451, 501))
