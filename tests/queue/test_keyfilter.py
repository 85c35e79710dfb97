"""The duplicate check's key filter (medagent/queue/keyfilter.py): no false negatives, the
coverage it claims, its memory cap; and the store with it against the store without it (the
oracle) over random lone records, groups, resends, clock steps and reopens. Real SQLite files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from test_journal import crash, open_store, record, same_step, table

from medagent.queue import keyfilter
from medagent.queue import store as store_module
from medagent.queue.durable import DurableQueue
from medagent.queue.keyfilter import KeyFilter
from medagent.queue.records import DuplicatePolicy
from medagent.queue.store import QueueStore

FLAG, DROP, OFF = DuplicatePolicy.FLAG, DuplicatePolicy.DROP, DuplicatePolicy.OFF


def test_every_key_added_inside_the_window_is_found() -> None:
    rng = random.Random(1)
    f = KeyFilter(100.0)
    added: list[tuple[tuple[str, str, str], float]] = []
    clock = 1000.0
    for i in range(30_000):
        clock += rng.uniform(0, 0.02)
        key = ("adt", "LAB", f"c{i}")
        f.add(key, clock)
        added.append((key, clock))
    oldest = clock - 100.0
    assert f.covers(oldest)
    assert all(f.may_contain(key, oldest) for key, at in added if at >= oldest)


def test_new_keys_are_mostly_answered_without_a_lookup() -> None:
    f = KeyFilter(3600.0)
    for i in range(50_000):
        f.add(("adt", "LAB", f"seen{i}"), 1000.0 + i / 1000)
    misses = sum(f.may_contain(("adt", "LAB", f"new{i}"), 0.0) for i in range(20_000))
    assert misses < 20_000 * 0.10  # ~3 % expected; a false positive only costs the SQLite lookup
    assert f.lookups_skipped == 20_000 - misses


def test_a_table_stored_before_the_open_is_not_covered_until_its_rows_leave_the_window() -> None:
    f = KeyFilter(60.0, covered_after=500.0)
    assert not f.covers(500.0)
    assert f.covers(500.5)
    assert KeyFilter(60.0).covers(-1e18)


def test_the_memory_cap_forgets_the_oldest_keys_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyfilter, "_MIN_KEYS", 64)
    f = KeyFilter(1000.0, max_bytes=64)  # one 64-key generation of 8 bits per key at most
    for i in range(64):
        f.add(("a", "s", str(i)), 100.0 + i)
    assert f.covers(99.0)
    f.add(("a", "s", "next"), 200.0)  # a second generation does not fit: the first is forgotten
    assert f.nbytes <= 64
    assert not f.covers(150.0)  # a window reaching its keys must ask SQLite
    assert f.covers(163.5) and f.may_contain(("a", "s", "next"), 163.5)


def test_generations_older_than_the_window_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyfilter, "_MIN_KEYS", 16)
    f = KeyFilter(10.0)
    for i in range(2_000):
        f.add(("a", "s", str(i)), float(i))
    assert len(f._generations) <= 4  # the window (10 s) in slices of 3.3 s, plus the current
    assert f.covers(1_999.0 - 10.0)


def test_a_lone_new_record_skips_the_lookup_and_a_resend_is_still_flagged(tmp_path: Path) -> None:
    store = open_store(tmp_path / "queue.db")
    try:
        for i in range(200):
            [result] = store.insert_batch([record(f"c{i}")], [FLAG])
            assert result.duplicate_of is None
        assert store.key_filter is not None and store.key_filter.lookups_skipped >= 190
        [resend] = store.insert_batch([record("c7")], [FLAG])
        assert resend.duplicate_of == 8
    finally:
        store.close()


def test_after_a_reopen_a_resend_of_an_earlier_row_is_found_in_sqlite(tmp_path: Path) -> None:
    """The new process's filter has not seen the rows already stored: it must not answer for them."""
    path = tmp_path / "queue.db"
    store = open_store(path)
    [first] = store.insert_batch([record("c1")], [FLAG])
    store.close()
    store = open_store(path)
    try:
        [resend] = store.insert_batch([record("c1")], [FLAG])
        assert resend.duplicate_of == first.row_id
        [journal_resend] = store.insert_batch([record("c1")], [DROP])
        assert journal_resend.row_id is None and journal_resend.duplicate_of == first.row_id
    finally:
        store.close()


def test_a_crash_replay_puts_the_journal_keys_in_the_filter(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    store = open_store(path)
    at = 1.7e9
    [first] = store.insert_batch([record("c1", received_at=at)], [FLAG])
    crash(store)  # the record is only in the journal
    store = open_store(path)
    try:
        [resend] = store.insert_batch([record("c1", received_at=at + 200)], [FLAG])
        assert resend.duplicate_of == first.row_id
    finally:
        store.close()


@pytest.mark.parametrize("seed", range(6))
def test_duplicate_answers_match_a_store_without_the_filter(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random lone records and groups (resends, reused ids, all three policies, a short window,
    a clock that sometimes steps back), failures, confirmations and crash/reopens, on a store
    with a small filter (many generations, a memory cap that bites) and one without."""
    monkeypatch.setattr(keyfilter, "_MIN_KEYS", 4)
    monkeypatch.setattr(store_module, "_HORIZON_MARGIN_S", 5.0)
    rng = random.Random(seed)
    filtered, plain = tmp_path / "f" / "queue.db", tmp_path / "p" / "queue.db"
    window = 40.0

    def open_both() -> list[QueueStore]:
        return [open_store(filtered, dedup_window_s=window, key_filter_mb=48 / 2**20),
                open_store(plain, dedup_window_s=window, key_filter_mb=0)]

    stores = open_both()
    clock = 1.7e9
    bodies = [b"MSH|one", b"MSH|two"]

    def one() -> tuple:
        cid = rng.choice(["", *[str(n) for n in range(12)]])
        return (record(cid, rng.choice(bodies), received_at=clock, channel=rng.choice(["a", "b"])),
                rng.choice([FLAG, FLAG, DROP, OFF]))

    skipped = 0
    try:
        for step in range(500):
            clock += rng.uniform(-6, 8) if rng.random() < 0.1 else rng.uniform(0, 4)
            [action] = rng.choices(["lone", "group", "fail", "retry", "confirm", "reopen"], [75, 10, 5, 3, 4, 3])
            if action != "reopen":
                answers = same_step(rng, stores, one, action)
            else:
                skipped += stores[0].key_filter.lookups_skipped
                for s in stores:
                    crash(s)
                stores = open_both()
                answers = [None, None]
            assert answers[0] == answers[1], (step, answers)
        assert skipped + stores[0].key_filter.lookups_skipped > 20  # the filter took part
        assert table(filtered) == table(plain)
    finally:
        for s in stores:
            s.close()


async def test_the_queue_counts_skipped_lookups_and_the_filter_can_be_turned_off(tmp_path: Path) -> None:
    async with DurableQueue(tmp_path / "on" / "queue.db") as queue:
        for i in range(20):
            assert (await queue.submit_wait(record(f"k{i}"))).ok
        resend = await queue.submit_wait(record("k3"))
        stats = queue.stats()
        assert resend.duplicate_of is not None
        assert stats["dedup_lookups_skipped"] >= 15 and stats["dedup_filter_bytes"] > 0
    async with DurableQueue(tmp_path / "off" / "queue.db", dedup_filter_mb=0) as queue:
        for i in range(5):
            assert (await queue.submit_wait(record(f"k{i}"))).ok
        assert (await queue.submit_wait(record("k3"))).duplicate_of is not None
        assert queue.stats()["dedup_lookups_skipped"] == 0 and queue.stats()["dedup_filter_bytes"] == 0
