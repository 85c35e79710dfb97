"""DurableQueue: reused control ids (issue 13 defect 3), file payloads, private files (issue 18
defect 2) and the storage health gate driven by real SQLite limits (issue 18 defect 1 without a
small file system: the database's page cap and a watermark above the real free space). The
same scenarios on a real full tmpfs are in test_disk_full.py.

Real SQLite files in tmp_path; every async test runs on asyncio and uvloop; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from medagent.queue import admin
from medagent.queue.durable import DurableQueue
from medagent.queue.records import CommitResult, DuplicatePolicy, FilePayload, InboundRecord
from medagent.storage.health import LOW_SPACE_REASON
from medagent.storage.space import disk_space

WAIT_S = 10.0
PHI = b"PID|1||123456^^^HOSP||DOE^JANE"


def record(control_id: str, body: bytes | None = None, *, file: FilePayload | None = None) -> InboundRecord:
    return InboundRecord(
        channel="adt", remote="127.0.0.1:40000", sender="LAB^NORTH", control_id=control_id,
        message_type="ORU^R01", body=body if body is not None else b"MSH|^~\\&|" + control_id.encode(),
        received_at=time.time(), file=file,
    )


async def drain(queue: DurableQueue, count: int) -> list[Any]:
    got: list[Any] = []
    for _ in range(count + 1):
        if len(got) >= count:
            break
        got += await asyncio.wait_for(queue.next_batch(count - len(got)), WAIT_S)
    return got


async def wait_until(condition: Any, timeout: float = WAIT_S) -> bool:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


def queue_log_lines(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "medagent.queue.durable" and r.levelno >= level]


@pytest.fixture(params=["normal", "fsync"])
def durability(request: pytest.FixtureRequest) -> str:
    """Commits on the loop thread (normal) and in the writer thread (fsync)."""
    return str(request.param)


# ---------------------------------------------------------------- reused control ids


async def test_a_reused_control_id_is_delivered_counted_and_logged_without_phi(
    tmp_path: Path, durability: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "medagent.queue.durable")
    async with DurableQueue(tmp_path / "queue.sqlite3", durability=durability) as queue:  # type: ignore[arg-type]
        a = await queue.submit_wait(record("CTRL7", b"MSH|A\r" + PHI), DuplicatePolicy.DROP)
        b = await queue.submit_wait(record("CTRL7", b"MSH|B\rPID|1||999^^^HOSP||ROE^RICHARD"), DuplicatePolicy.DROP)
        resend = await queue.submit_wait(record("CTRL7", b"MSH|A\r" + PHI), DuplicatePolicy.DROP)
        assert a.row_id == 1 and b.row_id == 2 and b.control_id_reused and b.duplicate_of is None
        assert resend.dropped and resend.duplicate_of == 1
        delivered = await drain(queue, 2)
        assert [m.row_id for m in delivered] == [1, 2]  # B reaches the hub: its bot runs
        stats = queue.stats()
        assert stats["controlIdReused"] == 1 and stats["duplicates_dropped"] == 1
    lines = [r for r in queue_log_lines(caplog) if "reused control id" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    text = lines[0].getMessage()
    assert "CTRL7" in text and "LAB^NORTH" in text and "adt" in text
    assert b"DOE" not in text.encode() and b"ROE" not in text.encode() and "PID" not in text


# ---------------------------------------------------------------- file payloads


def spool(data_dir: Path, name: str, content: bytes) -> FilePayload:
    directory = data_dir / "spool" / "pacs"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(content)
    return FilePayload(f"spool/pacs/{name}", len(content), hashlib.sha256(content).hexdigest())


async def test_file_payloads_are_handed_out_with_the_row_from_memory_and_after_restart(
    tmp_path: Path, durability: str
) -> None:
    payload = spool(tmp_path, "1.dcm", b"DICM" * 1000)
    path = tmp_path / "queue.sqlite3"
    async with DurableQueue(path, durability=durability) as queue:  # type: ignore[arg-type]
        result = await queue.submit_wait(record("1.2.3", b'{"meta":1}', file=payload))
        (message,) = await drain(queue, 1)
        assert message.row_id == result.row_id and message.file == payload and message.body == b'{"meta":1}'
        queue.release()
    async with DurableQueue(path, durability=durability) as queue:  # type: ignore[arg-type]
        (message,) = await drain(queue, 1)
        assert message.file == payload
        assert queue.stats()["store"]["spool_bytes"] == 4000
        queue.confirm([message.row_id])
    assert admin.purge(tmp_path, "confirmed") == 1
    assert not (tmp_path / payload.path).exists()  # the file went with its row


async def test_open_removes_orphaned_spool_files_and_keeps_referenced_ones(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    async with DurableQueue(path, orphan_grace_s=0) as queue:
        referenced = spool(tmp_path, "kept.dcm", b"kept")  # written after the open's sweep
        assert (await queue.submit_wait(record("K", b"{}", file=referenced))).ok
    orphan = spool(tmp_path, "orphan.dcm", b"left by a crash between row delete and unlink")
    async with DurableQueue(path, orphan_grace_s=0):
        pass
    assert (tmp_path / referenced.path).exists() and not (tmp_path / orphan.path).exists()


# ---------------------------------------------------------------- private files


async def test_queue_files_and_directories_are_private_under_umask_022(tmp_path: Path, durability: str) -> None:
    data_dir = tmp_path / "medagent-data"
    old = os.umask(0o022)
    try:
        async with DurableQueue(data_dir / "queue.sqlite3", durability=durability, reserve_mb=1) as queue:  # type: ignore[arg-type]
            assert (await queue.submit_wait(record("P", PHI))).ok
            files = ["queue.sqlite3", "queue.sqlite3-wal", "queue.sqlite3-shm", "queue.sqlite3.reserve"]
            file_modes = {name: stat.S_IMODE((data_dir / name).stat().st_mode) for name in files}
            dir_modes = {name: stat.S_IMODE((data_dir / name).stat().st_mode) for name in (".", "spool")}
    finally:
        os.umask(old)
    assert file_modes == dict.fromkeys(files, 0o600)
    assert dir_modes == {".": 0o700, "spool": 0o700}


# ---------------------------------------------------------------- storage health without a small disk


async def test_a_full_database_refuses_cheaply_logs_once_and_recovers_when_rows_are_purged(
    tmp_path: Path, durability: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The page cap (max_db_mb) gives SQLite's real "database or disk is full"; a 50 KB
    watermark keeps the queue refusing until retention (here: purge) frees pages."""
    caplog.set_level(logging.INFO, "medagent.queue.durable")
    queue = DurableQueue(tmp_path / "queue.sqlite3", durability=durability, max_db_mb=0.5,  # type: ignore[arg-type]
                         min_free_mb=0.05, min_free_percent=0, reserve_mb=0, storage_probe_interval_s=0.05)
    await queue.open()
    try:
        committed: list[int] = []
        first_error: str | None = None
        for batch in range(200):  # bounded: 0.5 MB fills after ~20 batches of 10 x 2 KB
            results = [await queue.submit_wait(record(f"{batch}-{i}", b"x" * 2000)) for i in range(10)]
            committed += [r.row_id for r in results if r.ok]  # type: ignore[misc]
            if not all(r.ok for r in results):
                first_error = next(r.error for r in results if not r.ok)
                break
        assert first_error is not None and first_error.startswith("storage error:")
        refused = [await queue.submit_wait(record(f"more-{i}", b"y")) for i in range(50)]
        assert all(not r.ok and r.error.startswith("storage error:") for r in refused)  # type: ignore[union-attr]
        assert queue.stats()["refused_storage"] >= 49  # answered without touching SQLite
        assert await wait_until(lambda: queue.stats()["storage"]["state"] == "low_space")
        # delivery continues: every committed row, confirmed (confirmations are written while LOW)
        delivered = await drain(queue, len(committed))
        assert [m.row_id for m in delivered] == committed
        queue.confirm(committed)
        assert await wait_until(lambda: admin.queue_stats(tmp_path)["states"]["confirmed"] == len(committed))
        assert admin.purge(tmp_path, "confirmed") == len(committed)
        assert await wait_until(lambda: queue.stats()["storage"]["state"] == "ok")
        assert (await queue.submit_wait(record("after", b"z"))).ok
    finally:
        await queue.close()
    lines = queue_log_lines(caplog, logging.INFO)
    changes = [r for r in lines if "storage" in r.getMessage() or "free" in r.getMessage()]
    assert 2 <= len(changes) <= 4, [r.getMessage() for r in changes]  # per state change, not per message
    assert not any(r.exc_info for r in caplog.records), "no tracebacks"


async def test_below_the_watermark_new_records_are_refused_before_the_disk_is_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A watermark above the real free space: the queue opens refusing, still delivers and
    confirms, and says so once."""
    caplog.set_level(logging.WARNING, "medagent.queue.durable")
    path = tmp_path / "queue.sqlite3"
    async with DurableQueue(path) as queue:
        first = await queue.submit_wait(record("before", b"a"))
    free_mb = disk_space(tmp_path).free_bytes / 1024 / 1024
    async with DurableQueue(path, min_free_mb=free_mb + 1024, reserve_mb=0) as queue:
        results = [await queue.submit_wait(record(f"r{i}", b"b")) for i in range(20)]
        assert all(r.error == LOW_SPACE_REASON for r in results)
        assert queue.stats()["storage"]["state"] == "low_space" and queue.stats()["committed"] == 0
        (message,) = await drain(queue, 1)
        assert message.row_id == first.row_id
        queue.confirm([message.row_id])
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT state FROM messages").fetchall() == [(2,)]  # confirmed
    low_lines = [r for r in queue_log_lines(caplog) if "low disk space" in r.getMessage()]
    assert len(low_lines) == 1


async def test_on_commit_sees_the_refusal_after_submit_returned(tmp_path: Path) -> None:
    free_mb = disk_space(tmp_path).free_bytes / 1024 / 1024
    async with DurableQueue(tmp_path / "q.sqlite3", min_free_mb=free_mb + 1024, reserve_mb=0) as queue:
        seen: list[CommitResult] = []
        queue.submit(record("x"), seen.append)
        assert seen == []  # never inside submit(): channels may not be ready for it
        assert await wait_until(lambda: len(seen) == 1)
        assert not seen[0].ok
