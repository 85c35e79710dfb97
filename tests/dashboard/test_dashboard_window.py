"""RecentWindow: last-hour counts kept incrementally, checked against a brute-force recount.

The SQL parts run on a real SQLite file with the hub's schema (medagent.hub.store.HubStore).
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from medagent.hub.dashboard.window import BUCKET_MS, WINDOW_MS, RecentWindow
from medagent.hub.store import HubStore

NOW = 1_800_000_000_000


def brute_hour(rows: list[tuple[int, str, str, int]], added_at: int, now: int, agent: str) -> int:
    """Rows of ``agent`` inside the window when added, whose 10 s bucket still overlaps it now."""
    return sum(1 for _, a, _, t in rows
               if a == agent and t >= added_at - WINDOW_MS and t - t % BUCKET_MS + BUCKET_MS > now - WINDOW_MS)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a1", "a2", "a3"]), st.sampled_from(["adt", "lab"]),
                          st.integers(-2 * WINDOW_MS, 1000)), max_size=300),
       st.integers(min_value=1, max_value=20), st.integers(0, 2 * WINDOW_MS))
def test_incremental_counts_equal_a_recount(raw: list[tuple[str, str, int]], chunks: int, advance: int) -> None:
    rows = [(i + 1, agent, channel, NOW + offset) for i, (agent, channel, offset) in enumerate(raw)]
    window = RecentWindow()
    size = max(1, len(rows) // chunks)
    for start in range(0, len(rows), size):  # fed in arbitrary slices, as refreshes would
        window.add(rows[start : start + size], NOW)
    for now in (NOW, NOW + advance):  # time passes: old buckets leave the window
        window.expire(now)
        for agent in ("a1", "a2", "a3"):
            assert window.hour_total.get(agent, 0) == brute_hour(rows, NOW, now, agent)
            per_channel = window.per_minute(agent, now)
            assert sum(sum(counts) for counts in per_channel.values()) == window.hour_total.get(agent, 0)
            recent = sum(1 for _, a, _, t in rows if a == agent and t >= NOW - WINDOW_MS
                         and t - t % BUCKET_MS + BUCKET_MS > now - 60_000)
            assert window.last_minute(now).get(agent, 0) == recent
    assert window.last_id == (rows[-1][0] if rows else 0)


def test_last_minute_and_minute_slots() -> None:
    window = RecentWindow()
    window.add([(1, "a", "adt", NOW - 5_000), (2, "a", "adt", NOW - 30_000), (3, "a", "lab", NOW - 90_000),
                (4, "b", "adt", NOW - 59 * 60_000 - 1)], NOW)
    assert window.last_minute(NOW) == {"a": 2}
    slots = window.per_minute("a", NOW)
    assert slots["adt"][59] == 2 and slots["lab"][58] == 1 and sum(slots["lab"]) == 1
    assert window.per_minute("b", NOW)["adt"][0] == 1
    window.add([(5, "a", "adt", NOW - 2 * WINDOW_MS)], NOW)  # too old: seen, not counted
    assert window.last_id == 5 and window.hour_total["a"] == 3


def test_bootstrap_starts_at_the_last_hour_and_refresh_reads_only_new_rows(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    store.close()
    conn = sqlite3.connect(tmp_path / "hub.sqlite3", isolation_level=None)
    rng = random.Random(5)
    times = sorted(NOW - rng.randint(0, 3 * WINDOW_MS) for _ in range(5000))
    insert = ("INSERT INTO messages (agent_id, channel, remote, callback, content_type, body, received_at)"
              " VALUES (?, ?, 'r', ?, 'text/plain', 'x', ?)")
    conn.executemany(insert, [(f"a{i % 3}", "adt", f"cb{i}", t) for i, t in enumerate(times)])
    window = RecentWindow()
    window.bootstrap(conn, NOW)
    expected = sum(1 for t in times if t >= NOW - WINDOW_MS + BUCKET_MS)  # whole buckets
    counted = sum(window.hour_total.values())
    assert expected <= counted <= sum(1 for t in times if t >= NOW - WINDOW_MS)
    assert window.last_id == 5000
    conn.executemany(insert, [("a1", "lab", f"new{i}", NOW) for i in range(7)])
    before = window.hour_total["a1"]
    window.refresh(conn, NOW)
    assert window.hour_total["a1"] == before + 7 and window.per_minute("a1", NOW)["lab"][59] == 7
    window.refresh(conn, NOW)  # nothing new: nothing counted twice
    assert window.hour_total["a1"] == before + 7
    conn.close()


def test_bootstrap_of_an_empty_store(tmp_path: Path) -> None:
    store = HubStore(tmp_path)
    store.close()
    conn = sqlite3.connect(tmp_path / "hub.sqlite3")
    window = RecentWindow()
    window.bootstrap(conn, NOW)
    assert window.last_id == 0 and not window.hour_total
    conn.close()
