"""RecentWindow: last-hour counts kept incrementally, checked against a brute-force recount.

The SQL parts run on a real SQLite file with the hub's schema (medagent.hub.store.sqlite.SqliteCore).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from medagent.hub.dashboard.idbound import DISORDER_MS, id_ceiling, id_floor
from medagent.hub.dashboard.queries import INDEXES, MessageFilter
from medagent.hub.dashboard.window import BUCKET_MS, WINDOW_MS, RecentWindow
from medagent.hub.schema import migrate
from medagent.hub.store.sqlite import SqliteCore

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
    store = SqliteCore(tmp_path)
    agents = [(store.add_agent(f"a{n}")).agent_id for n in range(3)]
    store.close()
    conn = sqlite3.connect(tmp_path / "hub.sqlite3", isolation_level=None)
    for statement in INDEXES:
        conn.execute(statement)
    rng = random.Random(5)
    times = sorted(NOW - rng.randint(0, 3 * WINDOW_MS) for _ in range(5000))
    insert = ("INSERT INTO messages (agent_id, channel, remote, callback, content_type, body, received_at)"
              " VALUES (?, ?, 'r', ?, 'text/plain', 'x', ?)")
    conn.executemany(insert, [(agents[i % 3], "adt", f"cb{i}", t) for i, t in enumerate(times)])
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    window = RecentWindow()
    window.bootstrap(conn, NOW)
    conn.set_trace_callback(None)
    count = next(q for q in statements if "GROUP BY" in q)
    plan = " ".join(str(r) for r in conn.execute("EXPLAIN QUERY PLAN " + count))
    assert "USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in plan, plan  # the hour's id range only
    for n, agent in enumerate(agents):
        mine = [t for i, t in enumerate(times) if i % 3 == n]
        whole = sum(1 for t in mine if t >= NOW - WINDOW_MS + BUCKET_MS)  # the oldest bucket may be cut
        assert whole <= window.hour_total[agent] <= sum(1 for t in mine if t >= NOW - WINDOW_MS)
    assert window.last_id == 5000
    conn.executemany(insert, [(agents[1], "lab", f"new{i}", NOW) for i in range(7)])
    before = window.hour_total[agents[1]]
    window.refresh(conn, NOW)
    assert window.hour_total[agents[1]] == before + 7 and window.per_minute(agents[1], NOW)["lab"][59] == 7
    window.refresh(conn, NOW)  # nothing new: nothing counted twice
    assert window.hour_total[agents[1]] == before + 7
    conn.close()


def test_bootstrap_of_an_empty_store(tmp_path: Path) -> None:
    store = SqliteCore(tmp_path)
    store.close()
    conn = sqlite3.connect(tmp_path / "hub.sqlite3")
    window = RecentWindow()
    window.bootstrap(conn, NOW)
    assert window.last_id == 0 and not window.hour_total
    conn.close()


async def test_counts_are_unknown_until_the_start_up_count_is_done(tmp_path: Path) -> None:
    from medagent.hub.dashboard.queries import HubReader

    store = SqliteCore(tmp_path)
    agent = (store.add_agent("a")).agent_id
    store.close()
    conn = sqlite3.connect(tmp_path / "hub.sqlite3", isolation_level=None)
    conn.executemany("INSERT INTO messages (agent_id, channel, remote, callback, content_type, body, received_at,"
                     " status) VALUES (?, 'adt', 'r', ?, 'text/plain', 'x', ?, ?)",
                     [(agent, f"cb{i}", NOW, "error" if i < 2 else "processed") for i in range(5)])
    conn.close()
    reader = HubReader(tmp_path / "hub.sqlite3")
    await reader.run(reader._open)  # opened, the last hour not counted yet
    try:
        counts = await reader.run(reader.agent_counts, [agent], NOW)
        assert (counts[agent].last_hour, counts[agent].last_minute, counts[agent].failed) == (None, None, 2)
        minutes = await reader.run(reader.channel_minutes, agent, NOW)
        assert minutes["adt"].errors == 2 and sum(minutes["adt"].counts) == 0  # failures known, counts not yet
        await asyncio.to_thread(reader._bootstrap_window)
        assert reader.window is not None and reader.window.last_id == 5
    finally:
        await reader.close()


def memory_store(times: list[int], agents: tuple[str, ...] = ("a1", "a2")) -> sqlite3.Connection:
    """The hub's schema in memory, one row per time (ids 1, 2, ... in that order)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn)
    conn.executemany("INSERT INTO messages (agent_id, channel, remote, callback, content_type, body, received_at)"
                     " VALUES (?, ?, 'r', ?, 'text/plain', 'x', ?)",
                     [(agents[i % len(agents)], ("adt", "lab")[i % 3 == 0], f"cb{i}", t) for i, t in enumerate(times)])
    return conn


def disordered_times(draw_steps: list[int], jitters: list[int], start: int) -> list[int]:
    """Times that grow with id except for a jitter below DISORDER_MS: a row may have been received
    up to that much later than a row stored after it (the bound idbound.py works under)."""
    times, base = [], start
    for step, jitter in zip(draw_steps, jitters, strict=False):
        base += step
        times.append(base + jitter)
    return times


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40_000), min_size=0, max_size=400),
       st.lists(st.integers(0, DISORDER_MS - 1), min_size=400, max_size=400),
       st.integers(-2 * WINDOW_MS, 0), st.integers(0, 200))
def test_start_up_count_equals_reading_every_row_when_times_are_out_of_order(
        steps: list[int], jitters: list[int], start: int, deleted: int) -> None:
    """The window's semantics: a row counts by its received_at (the last hour, to the 10 s bucket),
    whatever its id. The start-up count, which reads only the id range from the hour's first id
    on, must equal counting every row one by one (RecentWindow.add), out-of-order times near the
    hour's start included; rows deleted by retention leave gaps in the ids it bisects."""
    times = disordered_times(steps, jitters, NOW + start)
    conn = memory_store(times)
    conn.execute("DELETE FROM messages WHERE id % 7 = ? ", (deleted % 7,))
    rows = conn.execute("SELECT id, agent_id, channel, received_at FROM messages ORDER BY id").fetchall()
    every_row = RecentWindow()
    every_row.add(rows, NOW)
    started = RecentWindow()
    started.bootstrap(conn, NOW)
    assert started.hour_total == every_row.hour_total
    assert started.last_id == every_row.last_id
    for agent in ("a1", "a2"):
        assert started.per_minute(agent, NOW) == every_row.per_minute(agent, NOW)
        assert started.hour_total.get(agent, 0) == sum(1 for _, a, _, t in rows if a == agent
                                                       and NOW - WINDOW_MS <= t <= NOW + WINDOW_MS)
    for at in (NOW - WINDOW_MS, NOW - 60_000, NOW + start):
        floor, ceiling = id_floor(conn, at), id_ceiling(conn, at)
        assert all(t < at for i, _, _, t in rows if i < floor)
        assert all(t >= at for i, _, _, t in rows if i >= ceiling)
    conn.close()


async def test_searches_and_latencies_by_time_select_the_rows_received_then(tmp_path: Path) -> None:
    """A search's since/until and the bot latencies of the last 5 minutes select rows by
    received_at exactly, with times out of order (by less than DISORDER_MS) around the bounds."""
    from medagent.hub.dashboard.queries import HubReader

    store = SqliteCore(tmp_path)
    agent = (store.add_agent("a")).agent_id
    store.close()
    rng = random.Random(19)
    times = disordered_times([rng.randint(0, 3_000) for _ in range(3000)],
                             [rng.randrange(DISORDER_MS) for _ in range(3000)], NOW - 3_000 * 1_500)
    conn = sqlite3.connect(tmp_path / "hub.sqlite3", isolation_level=None)
    conn.executemany("INSERT INTO messages (agent_id, channel, remote, callback, content_type, body, received_at,"
                     " status, processed_at) VALUES (?, 'adt', 'r', ?, 'text/plain', 'x', ?, 'processed', ?)",
                     [(agent, f"cb{i}", t, t + i % 50) for i, t in enumerate(times)])
    conn.close()
    now = max(times)
    reader = HubReader(tmp_path / "hub.sqlite3")
    await reader.run(reader._open)
    try:
        for since, until in ((now - 600_000, None), (None, now - 900_000), (now - 2_000_000, now - 1_000_000)):
            found, before = [], None
            while True:  # every page of the search
                page, before = await reader.run(reader.search, MessageFilter(
                    agent_id=agent, since_ms=since, until_ms=until, before_id=before), 400)
                found += [r.id for r in page]
                if before is None:
                    break
            expected = [i + 1 for i, t in enumerate(times)
                        if (since is None or t >= since) and (until is None or t < until)]
            assert sorted(found) == expected and found, (since, until)
        minutes = await reader.run(reader.channel_minutes, agent, now)
        latencies = sorted((i % 50) for i, t in enumerate(times) if t >= now - 300_000)
        assert sorted(minutes["adt"].latencies_ms) == latencies and latencies
    finally:
        await reader.close()
