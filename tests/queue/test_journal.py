"""The intake journal (docs/intake-journal.md): framing, replay, the mover, duplicates across the
journal/SQLite boundary (today's store as the oracle), disk trouble, and the DurableQueue's use.

Real files and real SQLite throughout. Crash states are made by closing the store's handles
without the mover (what kill -9 leaves behind) or by putting back a copy of the journal taken
before a move (a crash after the mover's COMMIT and before its truncate); the process-level
kill -9 forms are in tests/faults/test_kill9.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from testsupport import mounted_tmpfs

from medagent.queue import durable
from medagent.queue.durable import DurableQueue
from medagent.queue.journal import IntakeJournal, decode_frames, encode_frame
from medagent.queue.records import DuplicatePolicy, InboundRecord, RowState
from medagent.queue.store import QueueStore
from medagent.storage.errors import STORAGE_ERROR_PREFIX

WAIT_S = 10.0
FLAG, DROP, OFF = DuplicatePolicy.FLAG, DuplicatePolicy.DROP, DuplicatePolicy.OFF


def row(row_id: int, **overrides: Any) -> tuple[Any, ...]:
    values: dict[str, Any] = {
        "id": row_id, "channel": "adt", "remote": "127.0.0.1:1", "sender": "LAB^N", "control_id": f"c{row_id}",
        "message_type": "ADT^A01", "content_type": "x-application/hl7-v2+er7", "body": b"MSH|\xe9\x00|" * 3,
        "received_at": 1.5e9 + row_id, "duplicate_of": None, "updated_at": 1.6e9, "file_path": None,
        "file_size": None, "file_sha256": None,
    }
    values.update(overrides)
    return tuple(values.values())


def record(control_id: str, body: bytes = b"MSH|x", *, received_at: float | None = None,
           channel: str = "adt", sender: str = "LAB^N") -> InboundRecord:
    return InboundRecord(channel, "127.0.0.1:1", sender, control_id, "ADT^A01", body,
                         time.time() if received_at is None else received_at)


def open_store(path: Path, *, journal: bool = True, **options: Any) -> QueueStore:
    store = QueueStore(path, **options)
    if journal:
        store.open_journal()
    return store


def crash(store: QueueStore) -> None:
    """What kill -9 leaves: the handles go, nothing is moved or emptied."""
    journal = store._journal
    store._journal = None
    if journal is not None:
        journal.close()
    store._conn.close()


def table(path: Path) -> list[tuple[Any, ...]]:
    """Every row, without updated_at (the time of the write that stored it)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT id, channel, remote, sender, control_id, message_type, content_type, body, received_at,"
            " state, attempts, duplicate_of, file_path, file_size, file_sha256 FROM messages ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


# ------------------------------------------------------------------------------------ framing

def test_frames_round_trip_every_field() -> None:
    rows = [row(1), row(2, duplicate_of=1, control_id="", body=b""),
            row(3, channel="ch\u00e9", file_path="spool/ch/a.dcm", file_size=12, file_sha256="AB" * 32)]
    data = b"".join(encode_frame(r) for r in rows)
    assert decode_frames(data) == (rows, len(data))


def test_a_torn_or_corrupt_tail_ends_the_replay_at_the_last_good_frame() -> None:
    first, second = encode_frame(row(1)), encode_frame(row(2))
    for cut in range(1, len(second)):
        assert decode_frames(first + second[:cut]) == ([row(1)], len(first))
    flipped = bytearray(first + second)
    flipped[len(first) + 12] ^= 0x01  # a payload byte of the second frame: its CRC no longer matches
    assert decode_frames(bytes(flipped)) == ([row(1)], len(first))
    garbage_length = (2**31).to_bytes(4, "little") + b"\0" * 12
    assert decode_frames(first + garbage_length) == ([row(1)], len(first))


def test_the_journal_file_is_private_and_append_only(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        journal = IntakeJournal(tmp_path / "j")
    finally:
        os.umask(old)
    try:
        journal.append(encode_frame(row(1)))
        journal.append(encode_frame(row(2)))
        assert (tmp_path / "j").stat().st_mode & 0o777 == 0o600
        assert journal.read_rows() == ([row(1), row(2)], 0)
        journal.reset()
        assert journal.read_rows() == ([], 0) and (tmp_path / "j").stat().st_size == 0
    finally:
        journal.close()


# ------------------------------------------------------------------------- store: the journal path

def test_a_lone_record_is_journaled_and_moved_by_the_next_transaction(tmp_path: Path) -> None:
    store = open_store(tmp_path / "queue.db")
    try:
        first = store.insert_batch([record("a")], [FLAG])[0]
        assert first.ok and store.journal_records == 1 and store.journal_path.stat().st_size > 0
        assert table(tmp_path / "queue.db") == []  # only in the journal so far
        group = store.insert_batch([record("b"), record("c")], [FLAG, FLAG])  # a group: SQLite, journal first
        assert [r.row_id for r in group] == [first.row_id + 1, first.row_id + 2]
        assert [r[0] for r in table(tmp_path / "queue.db")] == [1, 2, 3]
        assert store.journal_records == 0 and store.journal_path.stat().st_size == 0
        store.insert_batch([record("d")], [FLAG])
        store.mark_confirmed([4])  # a confirmation of a journal row: moved in the same transaction
        assert table(tmp_path / "queue.db")[-1][9] == RowState.CONFIRMED
    finally:
        store.close()


def test_readers_see_journal_records(tmp_path: Path) -> None:
    store = open_store(tmp_path / "queue.db")
    try:
        store.insert_batch([record("a")], [FLAG])
        assert [m.control_id for m in store.load_pending(0, 10)] == ["a"]
        store.insert_batch([record("b")], [FLAG])
        assert store.first_pending_id() == 1
        store.insert_batch([record("c")], [FLAG])
        assert store.stats()["pending"] == 3
        assert store.journal_records == 0
    finally:
        store.close()


def test_close_moves_the_journal_and_a_crash_leaves_it_for_the_replay(tmp_path: Path, caplog) -> None:
    path = tmp_path / "queue.db"
    store = open_store(path)
    store.insert_batch([record("a")], [FLAG])
    store.close()
    assert [r[4] for r in table(path)] == ["a"] and store.journal_path.stat().st_size == 0

    store = open_store(path)
    ids = [store.insert_batch([record(f"k{i}")], [FLAG])[0].row_id for i in range(5)]
    crash(store)
    with open(store.journal_path, "ab") as torn:  # a torn tail: the start of a frame that never finished
        torn.write(encode_frame(row(99))[:20])
    store = open_store(path)
    try:
        assert [r[0] for r in table(path)] == [1, *ids]
        assert store.journal_path.stat().st_size == 0
        assert store.insert_batch([record("next")], [FLAG])[0].row_id == ids[-1] + 1  # ids never reused
        assert store.insert_batch([record("k0")], [FLAG])[0].duplicate_of == ids[0]  # dedup sees replayed rows
    finally:
        store.close()
    replay_lines = [r.getMessage() for r in caplog.records if "replayed" in r.getMessage()]
    assert replay_lines == [f"queue {path}: intake journal replayed: 5 records, a torn tail of 20 bytes ignored"]


def test_a_replay_after_the_move_committed_is_idempotent(tmp_path: Path) -> None:
    """A crash after the mover's COMMIT and before its truncate: the journal still holds rows
    that are in SQLite, some since confirmed, some deleted by retention."""
    path = tmp_path / "queue.db"
    store = open_store(path)
    for i in range(6):
        store.insert_batch([record(f"m{i}")], [FLAG])
    left_behind = store.journal_path.read_bytes()
    store.mark_confirmed([1, 2, 3])  # moves all six, then confirms three
    store.purge([RowState.CONFIRMED])  # retention deleted 1..3 (id high-water 3)
    store.mark_confirmed([4])
    before = table(path)
    crash(store)
    store.journal_path.write_bytes(left_behind)
    store = open_store(path)
    try:
        assert table(path) == before  # nothing doubled, nothing deleted brought back, states kept
        assert [m.row_id for m in store.load_pending(0, 10)] == [5, 6]
    finally:
        store.close()


def test_an_admin_store_reads_the_journal_of_a_dead_writer_but_not_of_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    writer = open_store(path)
    writer.acquire_lease("writer", 1.0)
    writer.insert_batch([record("a")], [FLAG])
    admin = QueueStore(path, create=False)
    try:
        assert admin.load_pending(0, 10) == []  # a live writer's journal is its own
    finally:
        admin.close()
    crash(writer)
    time.sleep(1.1)  # its lease expires
    admin = QueueStore(path, create=False)
    try:
        assert [m.control_id for m in admin.load_pending(0, 10)] == ["a"]
    finally:
        admin.close()
    assert writer.journal_path.stat().st_size > 0  # only a lease holder empties it
    writer = open_store(path)
    try:
        assert [r[4] for r in table(path)] == ["a"] and writer.journal_path.stat().st_size == 0
    finally:
        writer.close()


def test_groups_after_journal_records_get_larger_ids(tmp_path: Path) -> None:
    store = open_store(tmp_path / "queue.db")
    try:
        ids = []
        for i in range(20):
            if i % 3 == 0:
                ids += [r.row_id for r in store.insert_batch([record(f"g{i}"), record(f"h{i}")], [FLAG, FLAG])]
            else:
                ids.append(store.insert_batch([record(f"l{i}")], [FLAG])[0].row_id)
        assert ids == list(range(1, len(ids) + 1))
        store.move_journal()
        assert [r[0] for r in table(tmp_path / "queue.db")] == ids
    finally:
        store.close()


# ------------------------------------------------------------------- duplicates: the oracle test

OneRecord = Callable[[], tuple[InboundRecord, DuplicatePolicy]]


def same_step(rng: random.Random, stores: list[QueueStore], one: OneRecord, action: str) -> list[Any]:
    """One step of an oracle test, with the same arguments on every store: a lone record, a group,
    confirmations, a failure or a retry of the failed; their answers (tests/queue/test_keyfilter.py
    uses it too)."""
    high = stores[-1]._last_id
    if action == "lone":
        rec, policy = one()
        return [s.insert_batch([rec], [policy]) for s in stores]
    if action == "group":
        batch = [one() for _ in range(rng.randint(2, 4))]
        return [s.insert_batch([r for r, _ in batch], [p for _, p in batch]) for s in stores]
    if action == "confirm":
        ids = [rng.randint(1, max(1, high)) for _ in range(3)] if high else []
        return [s.mark_confirmed(ids) for s in stores]
    if action == "fail":
        target = rng.randint(1, max(1, high))
        return [s.mark_failed(target, "rejected") for s in stores]
    if action == "retry":
        return [s.retry_failed() for s in stores]
    raise ValueError(f"unknown step {action!r}")


@pytest.mark.parametrize("seed", range(6))
def test_duplicate_answers_match_a_store_without_the_journal(tmp_path: Path, seed: int) -> None:
    """The same random sequence of lone records (resends, reused ids, all three policies, a short
    window), groups, confirmations, failures, moves and crash/reopens, on a store with the
    journal and one without: the same answers and, at the end, the same table."""
    rng = random.Random(seed)
    journaled, plain = tmp_path / "j" / "queue.db", tmp_path / "p" / "queue.db"
    window = 50.0
    stores = [open_store(journaled, dedup_window_s=window), open_store(plain, journal=False, dedup_window_s=window)]
    clock = 1.7e9
    bodies = [b"MSH|one", b"MSH|two", b"MSH|three"]

    def one() -> tuple[InboundRecord, DuplicatePolicy]:
        cid = rng.choice(["", "1", "2", "3", "4", "5"])
        return (record(cid, rng.choice(bodies), received_at=clock, channel=rng.choice(["a", "b"]),
                       sender=rng.choice(["S", "T"])),
                rng.choice([FLAG, FLAG, DROP, OFF]))

    try:
        for _step in range(400):
            clock += rng.uniform(0, 8)
            [action] = rng.choices(["lone", "group", "confirm", "fail", "move", "reopen"], [70, 8, 6, 4, 6, 6])
            if action == "move":
                stores[0].move_journal()
                answers = [None, None]
            elif action == "reopen":  # kill -9 of both, and a restart
                for s in stores:
                    crash(s)
                stores = [open_store(journaled, dedup_window_s=window),
                          open_store(plain, journal=False, dedup_window_s=window)]
                answers = [None, None]
            else:
                answers = same_step(rng, stores, one, action)
            assert answers[0] == answers[1], (_step, answers)
        assert [m.row_id for m in stores[0].load_pending(0, 10_000)] == [m.row_id for m in stores[1].load_pending(0, 10_000)]
        assert table(journaled) == table(plain)
    finally:
        for s in stores:
            s.close()


# ------------------------------------------------------------------------------- disk trouble

@pytest.fixture
def file_size_limit() -> Iterator[Any]:
    """set(n): writes past n bytes of any file fail (RLIMIT_FSIZE; SIGXFSZ ignored); restored after."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def set_limit(limit: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))

    try:
        yield set_limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_short_or_failed_write_refuses_the_record_and_keeps_the_journal_readable(
        tmp_path: Path, file_size_limit: Any) -> None:
    path = tmp_path / "queue.db"
    store = open_store(path)
    try:
        kept = [store.insert_batch([record(f"ok{i}")], [FLAG])[0].row_id for i in range(3)]
        good = store.journal_path.stat().st_size
        file_size_limit(good + 40)  # the next frame is written partly: a short write
        refused = store.insert_batch([record("big", b"x" * 500)], [FLAG])[0]
        assert store.journal_path.stat().st_size == good  # the partial frame was cut off
        file_size_limit(good)  # the write fails (EFBIG)
        again = store.insert_batch([record("big2", b"y" * 500)], [FLAG])[0]
        assert store.journal_path.stat().st_size == good  # the partial frame was cut off
        file_size_limit(resource.RLIM_INFINITY)
        for result in (refused, again):
            assert result.row_id is None and result.error is not None and result.error.startswith(STORAGE_ERROR_PREFIX)
        after = store.insert_batch([record("after")], [FLAG])[0]
        assert after.ok and after.row_id == kept[-1] + 1  # a refused record used no id
        crash(store)
        store = open_store(path)
        assert [r[4] for r in table(path)] == ["ok0", "ok1", "ok2", "after"]
    finally:
        store.close()


# ---------------------------------------------------------------------------- the DurableQueue

async def wait_until(condition: Any, timeout: float = WAIT_S) -> bool:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


async def test_the_queue_journals_lone_records_and_the_timed_mover_empties_it(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    journal = path.with_name("queue.db.intake.journal")
    queue = DurableQueue(path)
    await queue.open()
    try:
        results = [await queue.submit_wait(record(f"q{i}")) for i in range(3)]
        assert all(r.ok for r in results)
        assert await wait_until(lambda: queue.stats()["journal_records"] == 0)  # the timed mover
        assert journal.stat().st_size == 0 and [r[4] for r in table(path)] == ["q0", "q1", "q2"]
        batch = await asyncio.wait_for(queue.next_batch(10), WAIT_S)
        assert [m.control_id for m in batch] == ["q0", "q1", "q2"]
        queue.confirm([m.row_id for m in batch])
        assert (await queue.submit_wait(record("q3"))).ok
        # the held confirmations and the journal row reach SQLite (the mover's or the confirmations' job)
        assert await wait_until(lambda: [r[9] for r in table(path)] == [RowState.CONFIRMED] * 3 + [RowState.RECEIVED])
    finally:
        await queue.close()
    assert journal.stat().st_size == 0


async def test_the_mover_runs_when_the_journal_holds_its_count(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(durable, "_MOVE_AFTER_S", 3600.0)  # only the count trigger (and close) move
    path = tmp_path / "queue.db"
    async with DurableQueue(path) as queue:
        for i in range(durable._MOVE_RECORDS + 44):
            assert (await queue.submit_wait(record(f"r{i}"))).ok
        assert queue.stats()["journal_records"] == 44
        assert len(table(path)) == durable._MOVE_RECORDS
    assert len(table(path)) == durable._MOVE_RECORDS + 44  # close moved the rest


async def test_fsync_durability_does_not_use_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    async with DurableQueue(path, durability="fsync") as queue:
        assert (await queue.submit_wait(record("f"))).ok
        assert queue.stats()["journal_records"] == 0
        assert [r[4] for r in table(path)] == ["f"]
    assert not path.with_name("queue.db.intake.journal").exists()
    with pytest.raises(ValueError):
        DurableQueue(path, durability="fsync", intake_journal=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted in teardown (lazily, if a test left a file open)."""
    with mounted_tmpfs(tmp_path, 4 * 1024 * 1024) as mount_point:
        yield mount_point


async def test_a_full_disk_refuses_lone_records_and_loses_nothing_journaled(small_fs: Path) -> None:
    path = small_fs / "queue.db"
    options = {"min_free_mb": 0, "min_free_percent": 0, "reserve_mb": 0}  # let the writes hit ENOSPC
    filler = small_fs / "filler.bin"
    filler.write_bytes(b"\0" * (3 * 1024 * 1024))  # leaves ~1 MiB: a few dozen records
    queue = DurableQueue(path, lease_ttl_s=1.0, **options)  # a lease a full disk keeps from being released
    await queue.open()
    accepted: list[str] = []
    refused = None
    try:
        for i in range(600):  # bounded: 1 MiB of 8 KiB bodies
            result = await asyncio.wait_for(queue.submit_wait(record(f"d{i}", b"MSH|" + b"z" * 8000)), WAIT_S)
            if not result.ok:
                refused = result
                break
            accepted.append(f"d{i}")
    finally:
        await queue.close()
    assert refused is not None and refused.error is not None and refused.error.startswith(STORAGE_ERROR_PREFIX)
    assert accepted
    filler.unlink()  # the operator frees room and restarts: every accepted record is there, once
    await asyncio.sleep(1.2)  # (the lease a full disk may have kept expires)
    async with DurableQueue(path, **options) as queue:
        got: list[str] = []
        while len(got) < len(accepted):
            got += [m.control_id for m in await asyncio.wait_for(queue.next_batch(500), WAIT_S)]
    assert got == accepted
