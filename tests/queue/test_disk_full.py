"""Issue 18, defect 1 on a real full file system: an 8 MiB tmpfs mounted for each test.

Trial report: CE while full (correct), but after space was freed the WAL grew into it before
any checkpoint succeeded, `maintenance failed` tracebacks every 10 s, and a restart failed with
"database or disk is full". Here: the queue refuses cheaply while full, recovers on its own when
space returns, never logs per message or with a traceback, restarts on a full disk and delivers
what it holds, and its watermark refuses before the disk is full.

Mounting needs root (CAP_SYS_ADMIN). As root the mount must work: a failure fails the test. Not
as root, these tests skip; test_durable_storage.py covers the same state machine with SQLite's
own "database or disk is full" (the page cap) and a watermark above the real free space.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testsupport import mounted_tmpfs

from medagent.queue import admin
from medagent.queue.durable import DurableQueue
from medagent.queue.records import CommitResult, DuplicatePolicy, InboundRecord
from medagent.storage.health import LOW_SPACE_REASON
from medagent.storage.space import disk_space

WAIT_S = 15.0
FS_BYTES = 8 * 1024 * 1024
BODY = b"MSH|^~\\&|DISK|FULL|" + b"x" * 8000


def record(control_id: str) -> InboundRecord:
    return InboundRecord("adt", "127.0.0.1:40000", "LAB^NORTH", control_id, "ADT^A01", BODY, time.time())


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted in teardown (lazily, if a test left a file open)."""
    with mounted_tmpfs(tmp_path, FS_BYTES) as mount_point:
        yield mount_point


def fill(directory: Path, leave_bytes: int = 0) -> Path:
    """A filler file taking the file system's free space down to about `leave_bytes`
    (unbuffered writes: a full disk fails the write that hit it, nothing is left to flush)."""
    filler = directory / "filler.bin"
    chunk = b"\0" * 65536
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(FS_BYTES // len(chunk) + 2):  # bounded by the file system's size
            free = disk_space(directory).free_bytes
            if free <= leave_bytes:
                break
            try:
                os.write(fd, chunk[: min(len(chunk), free - leave_bytes)])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    return filler


async def wait_until(condition: Any, timeout: float = WAIT_S) -> bool:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


async def submit_until_refused(queue: DurableQueue, limit: int = 2000) -> tuple[list[int], CommitResult]:
    """Submit groups of 5 until a record is refused; the committed row ids and the refusal."""
    committed: list[int] = []
    for group in range(limit // 5):
        results = await asyncio.wait_for(
            asyncio.gather(*(queue.submit_wait(record(f"{group}-{i}"), DuplicatePolicy.FLAG) for i in range(5))), WAIT_S
        )
        committed += [r.row_id for r in results if r.ok]  # type: ignore[misc]
        refused = [r for r in results if not r.ok]
        if refused:
            return committed, refused[0]
    raise AssertionError("the file system never filled up")


async def drain(queue: DurableQueue, count: int) -> list[int]:
    got: list[int] = []
    for _ in range(count + 1):
        if len(got) >= count:
            break
        got += [m.row_id for m in await asyncio.wait_for(queue.next_batch(count - len(got)), WAIT_S)]
    return got


def problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("medagent") and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("durability", ["normal", "fsync"])
async def test_full_disk_refuses_cheaply_and_recovers_on_its_own(
    small_fs: Path, durability: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    filler = fill(small_fs, leave_bytes=3 * 1024 * 1024)
    queue = DurableQueue(small_fs / "queue.sqlite3", durability=durability,  # type: ignore[arg-type]
                         min_free_mb=0, min_free_percent=0, reserve_mb=1, storage_probe_interval_s=0.2)
    await queue.open()
    try:
        committed, refusal = await submit_until_refused(queue)
        assert refusal.error is not None and refusal.error.startswith("storage error:")
        assert "full" in refusal.error or refusal.error == LOW_SPACE_REASON
        assert len(committed) > 50
        wal_at_failure = Path(f"{queue.path}-wal").stat().st_size
        # while it is full (the reserve given back is not enough to accept again), submits are
        # answered without SQLite
        fill(small_fs)
        more = [await queue.submit_wait(record(f"while-full-{i}")) for i in range(100)]
        assert not any(r.ok for r in more) and queue.stats()["refused_storage"] >= 100
        # delivery and confirmation go on meanwhile; nothing committed is lost
        delivered = await drain(queue, len(committed))
        assert delivered == committed
        queue.confirm(delivered[:10])
        # space returns: the queue notices by itself and accepts again
        filler.unlink()
        assert await wait_until(lambda: queue.stats()["storage"]["state"] == "ok"), queue.stats()["storage"]
        after = await queue.submit_wait(record("after-recovery"))
        assert after.ok and after.row_id is not None and after.row_id > committed[-1]
        if wal_at_failure > 1024 * 1024:  # the WAL was truncated before intake resumed
            assert queue._checkpointer is not None and queue._checkpointer.truncations >= 1
        assert queue.stats()["storage"]["reserve_held"]
    finally:
        await queue.close()
    stats = admin.queue_stats(small_fs)
    assert stats["states"]["confirmed"] == 10  # held-back confirmations were written on recovery
    assert stats["pending"] == len(committed) - 10 + 1
    lines = problems(caplog)
    assert len(lines) <= 6, lines  # state changes (+ a checkpoint warning), not one per message
    assert not any(r.exc_info for r in caplog.records), "no tracebacks"
    assert "maintenance failed" not in caplog.text


# Nearly full: below the 1 MB watermark, but room for the confirmations. (A state change
# rewrites the whole row in SQLite, overflow pages included: confirming 40 rows of 8 KB
# appends ~350 KB to the WAL. The default 50 MB watermark covers that many times over.)
@pytest.mark.parametrize("reserve_mb, leave_bytes", [(1, 0), (0, 768 * 1024)])
async def test_restart_on_a_full_disk_starts_and_delivers_what_is_queued(
    small_fs: Path, reserve_mb: int, leave_bytes: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Completely full with the reserve to give back, or nearly full without one."""
    path = small_fs / "queue.sqlite3"
    options: dict[str, Any] = {"min_free_mb": 1, "min_free_percent": 0, "reserve_mb": reserve_mb}
    async with DurableQueue(path, **options) as queue:
        results = [await queue.submit_wait(record(f"queued-{i}")) for i in range(40)]
        assert all(r.ok for r in results)
    fill(small_fs, leave_bytes)  # a clean close removed the WAL: reopening must write a new one
    queue = DurableQueue(path, **options)
    await asyncio.wait_for(queue.open(), WAIT_S)
    try:
        assert queue.stats()["storage"]["state"] == "low_space"
        assert (await queue.submit_wait(record("new"))).error == LOW_SPACE_REASON
        delivered = await drain(queue, 40)
        assert delivered == [r.row_id for r in results]
        queue.confirm(delivered)
    finally:
        await queue.close()
    assert admin.queue_stats(small_fs)["states"]["confirmed"] == 40
    if reserve_mb:
        assert "released the 1 MB storage reserve" in caplog.text


async def test_the_watermark_refuses_before_the_disk_is_full_and_leaves_room_to_confirm(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    filler = fill(small_fs, leave_bytes=5 * 1024 * 1024)
    queue = DurableQueue(small_fs / "queue.sqlite3", min_free_mb=2, min_free_percent=0, reserve_mb=0,
                         storage_probe_interval_s=0.1)
    await queue.open()
    try:
        committed, refusal = await submit_until_refused(queue)
        assert refusal.error == LOW_SPACE_REASON
        assert queue.stats()["commit_errors"] == 0  # SQLite never hit the wall
        assert disk_space(small_fs).free_bytes > 1024 * 1024
        # A state change rewrites the row's page and, for these 8 KB rows, its last overflow
        # page: 50 confirmations append ~450 KB to the WAL, well inside the 2 MB kept free.
        delivered = await drain(queue, len(committed))
        queue.confirm(delivered[:50])
        assert await wait_until(lambda: admin.queue_stats(small_fs)["states"]["confirmed"] == 50)
        assert queue.stats()["storage"]["state"] == "low_space"
        filler.unlink()
        assert await wait_until(lambda: queue.stats()["storage"]["state"] == "ok")
        assert (await queue.submit_wait(record("room-again"))).ok
    finally:
        await queue.close()
    assert [m for m in problems(caplog) if "low disk space" in m].__len__() == 1
    assert not any("database or disk is full" in m for m in problems(caplog))
    assert not any(r.exc_info for r in caplog.records)


async def test_a_disk_that_stays_full_is_probed_with_backoff_and_logged_rarely(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Probe writes (the lease) fit, the held-back confirmations do not: relapses are not logged
    one per probe."""
    caplog.set_level(logging.INFO)
    queue = DurableQueue(small_fs / "queue.sqlite3", min_free_mb=0, min_free_percent=0, reserve_mb=0,
                         storage_probe_interval_s=0.05)
    await queue.open()
    try:
        committed, _ = await submit_until_refused(queue)
        delivered = await drain(queue, len(committed))
        queue.confirm(delivered)  # thousands of KB of rewritten pages: cannot fit
        await asyncio.sleep(3.0)  # 60 probes at the base interval; backoff makes it a handful
        failed_lines = [m for m in problems(caplog) if "refusing new messages and probing" in m]
        assert 1 <= len(failed_lines) <= 3, failed_lines
        assert queue.stats()["storage"]["state"] in ("failed", "low_space")
    finally:
        await queue.close()
    assert not any(r.exc_info for r in caplog.records)
