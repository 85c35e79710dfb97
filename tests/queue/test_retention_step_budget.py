"""The work budget of one incremental retention step (`QueueStore.step_budget_s`, issue 19).

A step runs inline on the agent's event loop, so it must stop after its budget however large the
table: the age walk reads one sub-window of ids after the budget is spent, the size trim deletes a
chunk sized from the measured cost per row (at least `_TRIM_MIN_ROWS`). A budget of 0 makes every
step as small as the design allows, which is what these tests observe (counts, never timings);
the rules themselves (never pending rows, the cap holds, oldest first) must not change.
Real SQLite files in tmp_path.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_store import OFF, age_rows, record, states
from test_sweep_slice import run_pass

from medagent.queue import store as store_module
from medagent.queue.records import RowState
from medagent.queue.store import QueueStore

ROWS = 5000  # > two age sub-windows


@pytest.fixture
def store(tmp_path: Path):
    opened = QueueStore(tmp_path / "queue.db")
    yield opened
    opened.close()


def fill_confirmed(store: QueueStore, rows: int, body: bytes | None = None) -> None:
    for start in range(0, rows, 1000):
        count = min(1000, rows - start)
        store.insert_batch([record(f"c{start + i}", body=body) for i in range(count)], [OFF] * count)
    store.mark_confirmed(range(1, rows + 1))


def test_a_spent_budget_ends_the_age_walk_after_one_sub_window(store: QueueStore) -> None:
    fill_confirmed(store, ROWS)  # settled just now: the age rules delete nothing
    store.step_budget_s = math.inf
    assert run_pass(store, 7, 512, 90, chunk_rows=500, scan_rows=20_000) == [0, 0]  # one walk step, one trim check
    store.step_budget_s = 0.0
    steps = run_pass(store, 7, 512, 90, chunk_rows=500, scan_rows=20_000)
    walk_steps = math.ceil(ROWS / store_module._AGE_SUBWINDOW_IDS)
    assert steps == [0] * (walk_steps + 1)
    assert len(states(store.path)) == ROWS


def test_one_walk_applies_both_age_rules_within_the_budget(store: QueueStore) -> None:
    fill_confirmed(store, ROWS)
    for row_id in range(10, 4000, 7):
        store.mark_failed(row_id, "bad")  # FAILED rows are spread over the whole id range
    age_rows(store.path, 100 * 86400)
    store.insert_batch([record("pending")], [OFF])
    store.step_budget_s = 0.0
    steps = run_pass(store, 7, 512, 90, chunk_rows=500, scan_rows=20_000)
    assert sum(steps) == ROWS and max(steps) <= 500
    assert list(states(store.path)) == [ROWS + 1]


def test_the_trim_chunk_shrinks_to_the_budget_and_the_cap_still_holds(store: QueueStore) -> None:
    fill_confirmed(store, 600, body=b"b" * 4000)
    store.insert_batch([record(f"p{i}", body=b"b" * 4000) for i in range(20)], [OFF] * 20)  # pending: kept
    store.step_budget_s = 0.0
    cap_mb = 1.0
    steps = run_pass(store, 7, cap_mb, 90, chunk_rows=500, scan_rows=20_000)
    assert 0 < max(steps) <= store_module._TRIM_MIN_ROWS
    assert store.used_bytes() <= cap_mb * 1024 * 1024
    remaining = states(store.path)
    assert all(remaining.get(row_id) == RowState.RECEIVED for row_id in range(601, 621))
    confirmed_left = sorted(i for i, s in remaining.items() if s == RowState.CONFIRMED)
    assert confirmed_left == list(range(601 - len(confirmed_left), 601))  # the oldest went first
