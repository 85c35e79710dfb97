"""Intake never waits for a checkpoint (issue 19, the soak's stalls): while the WAL checkpointer
holds the writer gate (a RESTART copies and syncs with the writer held out: 5-20 ms, past 100 ms
on a busy disk), a group of records is committed to the intake journal at once, confirmations
and the mover wait for the gate without holding the event loop, and everything reaches SQLite
once it is free. Without a usable journal, and while closing, the queue waits for the gate as
before.

The gate is held by a real thread, as the checkpointer does, until the test lets go (or HOLD_S
passed, so a regression that blocks the loop fails instead of hanging): what completed while it
still held the gate did not wait for it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medagent.queue.durable import DurableQueue
from medagent.queue.records import CommitResult, InboundRecord, RowState

HOLD_S = 5.0  # how long the simulated checkpoint keeps the gate at most


def record(control_id: str) -> InboundRecord:
    return InboundRecord("adt", "127.0.0.1:1", "LAB^N", control_id, "ADT^A01", b"MSH|" + control_id.encode(),
                         time.time())


def states(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT control_id, state FROM messages").fetchall())
    finally:
        conn.close()


@contextmanager
def checkpoint_holding_the_gate(queue: DurableQueue) -> Iterator[threading.Event]:
    """Another thread takes the queue's writer gate (what a RESTART does first) until the
    yielded event is set, or HOLD_S passed."""
    gate = queue._writer_gate  # the lock WalCheckpointer.writer_gate takes before a RESTART
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with gate:
            taken.set()
            release.wait(HOLD_S)

    holder = threading.Thread(target=hold, name="test-checkpoint")
    holder.start()
    assert taken.wait(5)
    try:
        yield release
    finally:
        release.set()
        holder.join(5)


async def submit_group(queue: DurableQueue, control_ids: list[str]) -> list[CommitResult]:
    """Submit in one loop turn (one group), then wait for every commit."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in control_ids]
    for control_id, future in zip(control_ids, futures):
        queue.submit(record(control_id), future.set_result)
    return list(await asyncio.gather(*futures))


async def test_records_commit_to_the_journal_while_a_checkpoint_holds_the_database(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    async with DurableQueue(path) as queue:
        first = await submit_group(queue, ["a0", "a1"])  # a SQLite group before the checkpoint
        batch = await queue.next_batch(10)
        with checkpoint_holding_the_gate(queue) as release:
            results = await submit_group(queue, [f"g{i}" for i in range(5)])
            lone = await queue.submit_wait(record("lone"))
            queue.confirm([row.row_id for row in batch])  # an update: it must wait, not block the loop
            await asyncio.sleep(0.05)  # the confirmations' hold, the mover's timer and retries run meanwhile
            still_held = queue._writer_gate.locked() and not release.is_set()
            stats = queue.stats()
        assert still_held, "the commits waited for the checkpoint"
        assert all(result.ok for result in [*first, *results, lone])
        ids = [result.row_id for result in [*first, *results, lone]]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert stats["journaled_during_checkpoint"] == 6 and stats["journal_records"] == 6
        assert set(states(path)) == {"a0", "a1"}  # nothing was written to SQLite meanwhile
        # once the gate is free the mover and the confirmations go through
        for _ in range(500):
            if queue.stats()["journal_records"] == 0 and states(path).get("a0") == RowState.CONFIRMED:
                break
            await asyncio.sleep(0.01)
        handed = await queue.next_batch(10)
        assert [row.control_id for row in handed] == [f"g{i}" for i in range(5)] + ["lone"]
    final = states(path)
    assert final["a0"] == final["a1"] == RowState.CONFIRMED
    assert sorted(final) == sorted(["a0", "a1", "lone", *(f"g{i}" for i in range(5))])


async def test_a_resend_during_the_checkpoint_is_still_recognised(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    async with DurableQueue(path) as queue:
        original = await queue.submit_wait(record("dup"))
        with checkpoint_holding_the_gate(queue):
            again, twice = await submit_group(queue, ["dup", "dup"])
    assert original.ok and again.duplicate_of == original.row_id and twice.duplicate_of == original.row_id


async def test_without_a_journal_the_group_waits_for_the_gate(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    async with DurableQueue(path, intake_journal=False) as queue:
        with checkpoint_holding_the_gate(queue) as release:
            threading.Timer(0.3, release.set).start()
            results = await submit_group(queue, ["w0", "w1"])
            assert release.is_set()  # committed to SQLite once the checkpoint let go
        assert all(result.ok for result in results)
        assert queue.stats()["journaled_during_checkpoint"] == 0
    assert set(states(path)) == {"w0", "w1"}


async def test_close_waits_for_the_checkpoint_and_writes_everything(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    queue = DurableQueue(path)
    await queue.open()
    with checkpoint_holding_the_gate(queue) as release:
        results = await submit_group(queue, ["c0", "c1", "c2"])
        batch = await queue.next_batch(10)
        queue.confirm([row.row_id for row in batch])
        threading.Timer(0.2, release.set).start()
        await queue.close()  # waits for the gate: the journal is moved, the confirmations written
    assert all(result.ok for result in results)
    assert states(path) == {"c0": RowState.CONFIRMED, "c1": RowState.CONFIRMED, "c2": RowState.CONFIRMED}
    assert path.with_name("queue.db.intake.journal").stat().st_size == 0


async def test_maintenance_waits_for_the_checkpoint_without_holding_the_loop(tmp_path: Path) -> None:
    """The lease renewal and retention are writer jobs too: with a short lease they run every
    0.1 s, and while the gate is taken they wait for it off the loop, so intake goes on."""
    path = tmp_path / "queue.db"
    async with DurableQueue(path, lease_ttl_s=0.3) as queue:
        with checkpoint_holding_the_gate(queue) as release:
            results = []
            for i in range(25):  # ~0.5 s: several maintenance rounds come due meanwhile
                results.append(await queue.submit_wait(record(f"m{i}")))
                await asyncio.sleep(0.02)
            still_held = queue._writer_gate.locked() and not release.is_set()
        assert still_held, "a maintenance job held the loop until the checkpoint let go"
        assert all(result.ok for result in results)
    assert len(states(path)) == 25
