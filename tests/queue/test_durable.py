"""DurableQueue: group commit, ordered delivery, confirm/release/fail, de-duplication, restart
and crash recovery, storage failure, lease, memory bound, operator retry, retention.

Real SQLite files in tmp_path; every async test runs on asyncio and uvloop (tests/conftest.py);
every wait is bounded by asyncio.wait_for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from medagent.queue import admin, durable
from medagent.queue.durable import DurableQueue, QueueClosed
from medagent.queue.records import (
    CommitResult,
    DuplicatePolicy,
    FilePayload,
    InboundRecord,
    RowState,
)
from medagent.queue.store import QueueLocked, QueueStore, SchemaTooNew

WAIT_S = 10.0


def record(control_id: str, *, channel: str = "adt", body: bytes | None = None) -> InboundRecord:
    return InboundRecord(
        channel=channel, remote="127.0.0.1:40000", sender="LAB^NORTH", control_id=control_id,
        message_type="ORU^R01", body=body if body is not None else b"MSH|^~\\&|" + control_id.encode(),
        received_at=time.time(),
    )


def db_states(path: Path) -> dict[int, int]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT id, state FROM messages"))


async def drain(queue: DurableQueue, count: int, batch: int = 1000) -> list[Any]:
    """Hand out exactly `count` rows (bounded in time)."""
    got: list[Any] = []
    for _ in range(count + 1):
        if len(got) >= count:
            break
        got += await asyncio.wait_for(queue.next_batch(min(batch, count - len(got))), WAIT_S)
    return got


async def submit_all(queue: DurableQueue, records: list[InboundRecord],
                     dedup: DuplicatePolicy = DuplicatePolicy.FLAG) -> list[CommitResult]:
    return list(await asyncio.wait_for(asyncio.gather(*(queue.submit_wait(r, dedup) for r in records)), WAIT_S))


@pytest.fixture(autouse=True, params=["inline", "thread"])
def writer_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with commits on the loop (durability normal) and in the writer thread (fsync)."""
    original = DurableQueue.__init__

    def init(self: DurableQueue, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("inline_writes", request.param == "inline")
        original(self, *args, **kwargs)

    monkeypatch.setattr(DurableQueue, "__init__", init)
    return str(request.param)


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[DurableQueue]:
    q = DurableQueue(tmp_path / "queue.sqlite3")
    await q.open()
    yield q
    await q.close()


# ---------------------------------------------------------------- intake


async def test_one_loop_iteration_commits_in_one_transaction_and_callbacks_follow_commit(
    queue: DurableQueue,
) -> None:
    results: list[CommitResult] = []
    seen_in_db: list[bool] = []
    path = queue.path

    def first_callback(result: CommitResult) -> None:
        with sqlite3.connect(path) as conn:  # an independent reader sees the row: it committed
            seen_in_db.append(conn.execute("SELECT count(*) FROM messages WHERE id = ?", (result.row_id,)).fetchone()[0] == 1)
        results.append(result)

    flushes_before = queue.stats()["flushes"]
    queue.submit(record("0"), first_callback)
    for i in range(1, 500):
        queue.submit(record(str(i)), results.append)
    assert results == []  # nothing is reported before COMMIT
    for _ in range(1000):
        if len(results) == 500:
            break
        await asyncio.sleep(0.005)
    assert [r.row_id for r in results] == list(range(1, 501))
    assert all(r.ok for r in results) and seen_in_db == [True]
    stats = queue.stats()
    assert stats["flushes"] - flushes_before == 1 and stats["largest_group"] == 500
    assert stats["committed"] == 500


async def test_submits_during_a_flush_gather_into_the_next_group(queue: DurableQueue) -> None:
    done: list[CommitResult] = []
    for round_ in range(20):
        for i in range(50):
            queue.submit(record(f"{round_}-{i}"), done.append)
        await asyncio.sleep(0)
    for _ in range(1000):
        if len(done) == 1000:
            break
        await asyncio.sleep(0.005)
    assert len(done) == 1000 and all(r.ok for r in done)
    assert queue.stats()["flushes"] <= 20
    assert [r.row_id for r in done] == list(range(1, 1001))


async def test_failing_callback_does_not_hurt_the_others(queue: DurableQueue) -> None:
    def broken(result: CommitResult) -> None:
        raise RuntimeError("channel bug")

    queue.submit(record("a"), broken)
    assert (await queue.submit_wait(record("b"))).ok


async def test_dedup_flag_and_drop(queue: DurableQueue) -> None:
    first = await queue.submit_wait(record("M1"))
    flagged = await queue.submit_wait(record("M1"), DuplicatePolicy.FLAG)
    dropped = await queue.submit_wait(record("M1"), DuplicatePolicy.DROP)
    unchecked = await queue.submit_wait(record("M1"), DuplicatePolicy.OFF)
    assert flagged.row_id == 2 and flagged.duplicate_of == first.row_id
    assert dropped.ok and dropped.row_id is None and dropped.duplicate_of == first.row_id
    assert unchecked.row_id == 3 and unchecked.duplicate_of is None
    messages = await drain(queue, 3)
    assert [(m.row_id, m.duplicate_of) for m in messages] == [(1, None), (2, 1), (3, None)]
    stats = queue.stats()
    assert stats["duplicates_flagged"] == 1 and stats["duplicates_dropped"] == 1


async def test_storage_full_reports_errors_and_keeps_what_committed(tmp_path: Path) -> None:
    queue = DurableQueue(tmp_path / "queue.sqlite3", max_db_mb=0.25)
    await queue.open()
    try:
        committed: list[int] = []
        error = None
        for batch in range(100):
            results = await submit_all(queue, [record(f"{batch}-{i}", body=b"z" * 4000) for i in range(10)])
            if not results[0].ok:
                error = results[0].error
                assert all(not r.ok for r in results)
                break
            committed += [r.row_id for r in results]
        assert error is not None and error.startswith("storage error:")
        assert queue.stats()["commit_errors"] == 10
        delivered = await drain(queue, len(committed))
        assert [m.row_id for m in delivered] == committed
    finally:
        await queue.close()


# ---------------------------------------------------------------- delivery


async def test_next_batch_is_fifo_across_groups_and_channels(queue: DurableQueue) -> None:
    await submit_all(queue, [record(str(i), channel="adt" if i % 2 else "lab") for i in range(30)])
    await submit_all(queue, [record(f"late-{i}") for i in range(10)])
    batches = [await asyncio.wait_for(queue.next_batch(7), WAIT_S) for _ in range(6)]
    assert [len(b) for b in batches] == [7, 7, 7, 7, 7, 5]
    assert [m.row_id for b in batches for m in b] == list(range(1, 41))
    assert queue.stats()["inflight"] == 40


async def test_next_batch_waits_for_a_commit(queue: DurableQueue) -> None:
    waiter = asyncio.ensure_future(queue.next_batch(10))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await queue.submit_wait(record("x"))
    batch = await asyncio.wait_for(waiter, WAIT_S)
    assert [m.control_id for m in batch] == ["x"]


async def test_confirm_release_fail(queue: DurableQueue) -> None:
    await submit_all(queue, [record(str(i)) for i in range(6)])
    first = await drain(queue, 4)
    queue.release([3, 1])
    queue.confirm([2])
    again = await drain(queue, 4)
    assert [(m.row_id, m.attempts) for m in again] == [(1, 1), (3, 1), (5, 0), (6, 0)]
    queue.fail(5, "hub rejected: bad segment")
    queue.release()  # all in flight: 1, 3, 4, 6
    assert [m.row_id for m in await drain(queue, 4)] == [1, 3, 4, 6]
    queue.confirm([1, 3, 4, 6])
    assert first[0].body == b"MSH|^~\\&|0"
    path = queue.path
    await queue.close()
    assert db_states(path) == {i: RowState.CONFIRMED for i in (1, 2, 3, 4, 6)} | {5: RowState.FAILED}
    with sqlite3.connect(path) as conn:
        attempts = dict(conn.execute("SELECT id, attempts FROM messages"))
    assert attempts == {1: 2, 2: 0, 3: 2, 4: 1, 5: 0, 6: 1}


async def test_confirmations_are_held_then_ride_a_group_commit_or_are_written_alone(
    queue: DurableQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Confirmations gate no ACK: while not due a lone record's commit goes without them (one
    autocommit INSERT); once due they join the next group commit (one transaction for both) and,
    when no record comes, are written by themselves."""
    monkeypatch.setattr(durable, "_CONFIRM_HOLD_S", 3600.0)
    await submit_all(queue, [record(str(i)) for i in range(4)])
    await drain(queue, 4)
    flushes = queue.stats()["flushes"]
    queue.confirm([1, 2, 3])
    assert (await queue.submit_wait(record("next"))).row_id == 5
    assert queue.stats()["flushes"] == flushes + 1
    assert set(db_states(queue.path).values()) == {RowState.RECEIVED}  # held: not due yet
    monkeypatch.setattr(durable, "_CONFIRM_HOLD_S", 0.0)
    assert (await queue.submit_wait(record("then"))).row_id == 6
    assert queue.stats()["flushes"] == flushes + 2  # the insert and the confirmations: one commit
    assert db_states(queue.path) == {1: RowState.CONFIRMED, 2: RowState.CONFIRMED, 3: RowState.CONFIRMED,
                                     4: RowState.RECEIVED, 5: RowState.RECEIVED, 6: RowState.RECEIVED}
    queue.confirm([4])  # nothing else to write: it goes alone
    for _ in range(int(WAIT_S / 0.01)):
        # (writer thread: the commit is visible before the loop has handled its completion)
        if db_states(queue.path)[4] == RowState.CONFIRMED and queue.stats()["flushes"] > flushes + 2:
            break
        await asyncio.sleep(0.01)
    assert db_states(queue.path)[4] == RowState.CONFIRMED
    assert queue.stats()["flushes"] == flushes + 3


async def test_a_group_of_records_carries_held_confirmations_in_slices(
    queue: DurableQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group commit of several records is a transaction anyway: it carries confirmations that
    are not due yet, at most _CONFIRM_RIDE_MAX per commit (the rest ride the next ones), so no
    single commit pays for a long backlog while its devices wait."""
    monkeypatch.setattr(durable, "_CONFIRM_HOLD_S", 3600.0)
    monkeypatch.setattr(durable, "_CONFIRM_RIDE_MAX", 3)
    await submit_all(queue, [record(str(i)) for i in range(5)])
    await drain(queue, 5)
    flushes = queue.stats()["flushes"]
    queue.confirm([1, 2, 3, 4, 5])
    await submit_all(queue, [record("a"), record("b")])  # one group: ids 6, 7 and confirmations 1-3
    assert queue.stats()["flushes"] == flushes + 1
    confirmed = {i for i, state in db_states(queue.path).items() if state == RowState.CONFIRMED}
    assert confirmed == {1, 2, 3}
    await submit_all(queue, [record("c"), record("d")])  # the next group takes the rest
    confirmed = {i for i, state in db_states(queue.path).items() if state == RowState.CONFIRMED}
    assert confirmed == {1, 2, 3, 4, 5}
    assert queue.stats()["flushes"] == flushes + 2


async def test_the_rows_listener_takes_committed_rows_before_next_batch_waiters_wake(
    queue: DurableQueue, tmp_path: Path
) -> None:
    """After a group's on_commit callbacks, the listener may take rows in the commit's loop turn
    (take_ready: in id order, stopping before a file payload); a waiter gets only what is left,
    and is not woken when nothing is."""
    events: list[str] = []
    taken: list[int] = []

    def listener() -> None:
        events.append("listener")
        taken.extend(m.row_id for m in queue.take_ready(2))

    queue.set_rows_listener(listener)
    waiter = asyncio.ensure_future(queue.next_batch(10))
    await asyncio.sleep(0)  # parked in next_batch
    spooled = tmp_path / "spool" / "pacs" / "x.dcm"
    spooled.parent.mkdir(parents=True)
    spooled.write_bytes(b"DICM")
    with_file = dataclasses.replace(record("f"), file=FilePayload("spool/pacs/x.dcm", 4, "ab" * 32))
    loop = asyncio.get_running_loop()
    done = [loop.create_future() for _ in range(4)]
    for future, rec in zip(done, [record("a"), with_file, record("b"), record("c")], strict=True):
        queue.submit(rec, lambda result, future=future: (events.append("on_commit"), future.set_result(result)))
    await asyncio.wait_for(asyncio.gather(*done), WAIT_S)
    assert events == ["on_commit"] * 4 + ["listener"]
    assert taken == [1]  # stops before the file payload (row 2): its upload needs a task
    assert [m.row_id for m in await asyncio.wait_for(waiter, WAIT_S)] == [2, 3, 4]

    waiter = asyncio.ensure_future(queue.next_batch(10))
    await asyncio.sleep(0)
    await submit_all(queue, [record("d")])
    for _ in range(3):
        await asyncio.sleep(0)
    assert taken == [1, 5] and not waiter.done()  # the listener took it all: the waiter sleeps on
    queue.set_rows_listener(None)
    await submit_all(queue, [record("e")])
    assert [m.row_id for m in await asyncio.wait_for(waiter, WAIT_S)] == [6]


async def test_late_confirm_of_a_released_row_is_not_delivered_again(queue: DurableQueue) -> None:
    await submit_all(queue, [record(str(i)) for i in range(3)])
    await drain(queue, 3)
    queue.release([1, 2])
    queue.confirm([1])  # the hub's answer arrived after we gave up on it
    assert [m.row_id for m in await drain(queue, 1)] == [2]
    assert queue.stats()["ready_in_memory"] == 0


async def test_memory_bound_spills_to_disk_and_keeps_order(tmp_path: Path) -> None:
    queue = DurableQueue(tmp_path / "queue.sqlite3", memory_max_rows=50, memory_max_bytes=1_000_000)
    await queue.open()
    try:
        await submit_all(queue, [record(str(i)) for i in range(300)])
        stats = queue.stats()
        assert stats["ready_in_memory"] <= 50 and stats["backlog_on_disk"]
        got = []
        for _ in range(400):
            if len(got) == 300:
                break
            batch = await asyncio.wait_for(queue.next_batch(37), WAIT_S)
            assert queue.stats()["ready_in_memory"] <= 50
            queue.confirm([m.row_id for m in batch])
            got += [m.row_id for m in batch]
        assert got == list(range(1, 301))
        assert queue.stats()["loaded_from_disk"] > 0
    finally:
        await queue.close()


async def test_commits_completing_while_a_refill_is_pending_keep_every_row(tmp_path: Path) -> None:
    """A group commit that finishes while a read-back from disk has not reported yet must not be
    handled before it (the shortcut that answers a commit in its own loop turn waits its turn):
    otherwise the read-back's 'disk exhausted' would hide the new row and it would never be
    handed out."""
    queue = DurableQueue(tmp_path / "queue.sqlite3", memory_max_rows=4, memory_max_bytes=1_000_000)
    await queue.open()
    try:
        await submit_all(queue, [record(f"a{i}") for i in range(6)])  # rows 5 and 6 stay on disk
        first = await asyncio.wait_for(queue.next_batch(4), WAIT_S)
        assert [m.row_id for m in first] == [1, 2, 3, 4] and queue.stats()["backlog_on_disk"]
        committed: list[CommitResult] = []
        # next_batch's first step reads rows 5 and 6 back (its report is scheduled), then the
        # commit of row 7, scheduled after it, runs before that report
        task = asyncio.ensure_future(queue.next_batch(4))
        queue.submit(record("b"), committed.append)
        got = [m.row_id for m in await asyncio.wait_for(task, WAIT_S)]
        got += [m.row_id for m in await drain(queue, 3 - len(got))]
        assert got == [5, 6, 7]
        assert [r.row_id for r in committed] == [7]
    finally:
        await queue.close()


async def test_memory_bound_in_bytes(tmp_path: Path) -> None:
    queue = DurableQueue(tmp_path / "queue.sqlite3", memory_max_bytes=10_000)
    await queue.open()
    try:
        await submit_all(queue, [record(str(i), body=b"q" * 1000) for i in range(40)])
        assert queue.stats()["ready_bytes"] <= 10_000
        assert [m.row_id for m in await drain(queue, 40, batch=6)] == list(range(1, 41))
    finally:
        await queue.close()


# ---------------------------------------------------------------- lifecycle and recovery


async def test_restart_delivers_unconfirmed_rows_in_order(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    queue = DurableQueue(path)
    await queue.open()
    uuid = queue.queue_uuid
    await submit_all(queue, [record(str(i)) for i in range(100)])
    handed = await drain(queue, 30)
    queue.confirm([m.row_id for m in handed[:10]])
    queue.release([m.row_id for m in handed[10:15]])
    await queue.close()  # rows 11..30 were in flight or released: still pending

    reopened = DurableQueue(path)
    await reopened.open()
    try:
        assert reopened.queue_uuid == uuid
        again = await drain(reopened, 90)
        assert [m.row_id for m in again] == list(range(11, 101))
        assert {m.row_id: m.attempts for m in again if m.attempts} == {i: 1 for i in range(11, 16)}
        assert (await reopened.submit_wait(record("after"))).row_id == 101
        assert [m.row_id for m in await drain(reopened, 1)] == [101]
    finally:
        await reopened.close()


async def test_second_queue_on_the_same_file_is_locked_out(queue: DurableQueue) -> None:
    other = DurableQueue(queue.path)
    with pytest.raises(QueueLocked, match="in use by"):
        await other.open()
    await other.close()


async def test_closed_queue_rejects_work(tmp_path: Path) -> None:
    queue = DurableQueue(tmp_path / "queue.sqlite3")
    await queue.open()
    waiter = asyncio.ensure_future(queue.next_batch(1))
    await asyncio.sleep(0)
    await queue.close()
    with pytest.raises(QueueClosed):
        await asyncio.wait_for(waiter, WAIT_S)
    result = await asyncio.wait_for(queue.submit_wait(record("late")), WAIT_S)
    assert result.error == "queue closed"
    with pytest.raises(QueueClosed):
        await queue.next_batch(1)
    await queue.close()  # idempotent
    assert queue.stats()["open"] is False


async def test_close_commits_what_was_submitted(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    queue = DurableQueue(path)
    await queue.open()
    results: list[CommitResult] = []
    for i in range(20):
        queue.submit(record(str(i)), results.append)
    await queue.close()
    assert len(results) == 20 and all(r.ok for r in results)
    assert len(db_states(path)) == 20


async def test_operator_retry_reaches_a_running_queue(tmp_path: Path) -> None:
    queue = DurableQueue(tmp_path / "queue.sqlite3", lease_ttl_s=0.3)
    await queue.open()
    try:
        await submit_all(queue, [record(str(i)) for i in range(5)])
        handed = await drain(queue, 5)
        queue.fail(2, "hub rejected")
        queue.confirm([m.row_id for m in handed if m.row_id != 2])
        for _ in range(200):  # wait until the failure is written
            if admin.list_failed(tmp_path):
                break
            await asyncio.sleep(0.01)
        assert admin.retry_failed(tmp_path) == 1
        again = await drain(queue, 1)
        assert [m.row_id for m in again] == [2]
    finally:
        await queue.close()


async def test_retention_runs_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    queue = DurableQueue(path, lease_ttl_s=0.3, retention_days=0.0, sweep_interval_s=0.1)
    await queue.open()
    try:
        await submit_all(queue, [record(str(i)) for i in range(10)])
        handed = await drain(queue, 10)
        queue.confirm([m.row_id for m in handed[:6]])
        for _ in range(300):  # the store's recount may wait a pass or two (its duty-cycle bound)
            if queue.stats()["swept"] == 6 and queue.stats()["store"].get("pending") == 4:
                break
            await asyncio.sleep(0.01)
        assert queue.stats()["swept"] == 6
        assert sorted(db_states(path)) == [7, 8, 9, 10]
        assert queue.stats()["store"]["pending"] == 4
    finally:
        await queue.close()


# ---------------------------------------------------------------- kill -9

CRASHING_AGENT = r"""
import asyncio, sys, time
from pathlib import Path
from medagent.queue import DurableQueue, InboundRecord

async def main(path, count):
    queue = DurableQueue(Path(path))
    await queue.open()
    def reported(index, result):
        if result.ok:
            sys.stdout.write(f"committed {index} {result.row_id}\n")
            sys.stdout.flush()
    for i in range(count):
        body = b"MSH|^~\\&|KILL|" + str(i).encode()
        queue.submit(InboundRecord("adt", "10.0.0.1:1", "KILL^TEST", str(i), "ADT^A01", body, time.time()),
                     lambda result, i=i: reported(i, result))
        if i % 25 == 24:
            await asyncio.sleep(0)
    print("all submitted", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_everything_reported_committed_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    count = 2000
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_AGENT, str(path), str(count)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    watchdog = threading.Timer(20.0, proc.kill)
    watchdog.start()
    reported: dict[int, int] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the process dies (watchdog or kill below)
            if line.startswith("committed"):
                _, index, row_id = line.split()
                reported[int(index)] = int(row_id)
                if len(reported) == 700:
                    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: more commits were in flight
        proc.wait(timeout=20)
    finally:
        watchdog.cancel()
        proc.kill()
        stderr = proc.stderr.read() if proc.stderr else ""
        proc.wait(timeout=20)
    assert proc.returncode == -signal.SIGKILL, stderr
    assert len(reported) >= 700

    store = QueueStore(path)
    try:
        rows = {m.control_id: m for m in store.load_pending(0, 10_000)}
        for index, row_id in reported.items():
            assert rows[str(index)].row_id == row_id
            assert rows[str(index)].body == b"MSH|^~\\&|KILL|" + str(index).encode()
        assert store.lease_info()["pid"] == proc.pid  # the dead agent still "holds" the lease
    finally:
        store.close()

    async def reopen() -> list[int]:
        queue = DurableQueue(path)  # takes over at once: the holder's pid is dead on this host
        await queue.open()
        try:
            return [m.row_id for m in await drain(queue, len(rows))]
        finally:
            await queue.close()

    assert asyncio.run(reopen()) == sorted(m.row_id for m in rows.values())


async def test_concurrent_close_calls_all_finish(tmp_path: Path) -> None:
    queue = DurableQueue(tmp_path / "queue.sqlite3")
    await queue.open()
    queue.submit(record("last"), lambda result: None)
    await asyncio.wait_for(asyncio.gather(queue.close(), queue.close(), queue.close()), WAIT_S)
    assert admin.queue_stats(tmp_path)["states"]["received"] == 1
    assert admin.queue_stats(tmp_path)["lease"] is None


async def test_open_refuses_a_database_from_newer_code(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    QueueStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 999")
    queue = DurableQueue(path)
    with pytest.raises(SchemaTooNew):
        await queue.open()
    await queue.close()
