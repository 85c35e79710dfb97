"""Admin functions for `medagent queue ...`: stats, failed rows, retry, purge; alone and beside a
running DurableQueue on the same data_dir."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from medagent.queue import admin
from medagent.queue.durable import DurableQueue
from medagent.queue.records import DuplicatePolicy, FilePayload, InboundRecord
from medagent.queue.store import QueueError, QueueStore


def record(control_id: str, channel: str = "adt") -> InboundRecord:
    return InboundRecord(channel, "127.0.0.1:40000", "LAB^NORTH", control_id, "ADT^A01",
                         b"MSH|^~\\&|SECRET-PATIENT|" + control_id.encode(), time.time())


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data_dir whose queue has rows 1-3 confirmed, 4-5 failed, 6-8 pending."""
    store = QueueStore(admin.queue_path(tmp_path))
    store.insert_batch([record(str(i)) for i in range(8)], [DuplicatePolicy.OFF] * 8)
    store.mark_confirmed([1, 2, 3])
    store.mark_failed(4, "hub rejected: AR")
    store.mark_failed(5, "hub rejected: AE")
    store.close()
    return tmp_path


def age(data_dir: Path, ids: list[int], seconds: float) -> None:
    with sqlite3.connect(admin.queue_path(data_dir)) as conn:
        conn.executemany("UPDATE messages SET updated_at = updated_at - ? WHERE id = ?", [(seconds, i) for i in ids])


def test_queue_file_name() -> None:
    assert admin.QUEUE_FILENAME == "queue.sqlite3"
    assert admin.queue_path("/var/lib/medagent") == Path("/var/lib/medagent/queue.sqlite3")


def test_stats(data_dir: Path) -> None:
    stats = admin.queue_stats(data_dir)
    assert stats["states"] == {"received": 3, "sent": 0, "confirmed": 3, "failed": 2}
    assert stats["channels"]["adt"]["pending"] == 3
    assert stats["lease"] is None and len(stats["queue_uuid"]) == 32


def test_list_failed_has_no_bodies(data_dir: Path) -> None:
    failed = admin.list_failed(data_dir)
    assert [(f["id"], f["last_error"]) for f in failed] == [(4, "hub rejected: AR"), (5, "hub rejected: AE")]
    assert "SECRET-PATIENT" not in repr(failed)
    assert admin.list_failed(data_dir, limit=1)[0]["id"] == 4


def test_retry_failed_all_or_some(data_dir: Path) -> None:
    assert admin.retry_failed(data_dir, ids=[5, 7]) == 1  # 7 is not failed
    assert [f["id"] for f in admin.list_failed(data_dir)] == [4]
    assert admin.retry_failed(data_dir) == 1
    assert admin.retry_failed(data_dir) == 0
    assert admin.queue_stats(data_dir)["states"]["received"] == 5


def test_purge(data_dir: Path) -> None:
    age(data_dir, [1, 4], 3600)
    assert admin.purge(data_dir, "confirmed", older_than_s=60) == 1
    assert admin.purge(data_dir, "settled", older_than_s=60) == 1
    assert admin.purge(data_dir, "settled") == 3
    assert admin.queue_stats(data_dir)["states"] == {"received": 3, "sent": 0, "confirmed": 0, "failed": 0}


def test_purge_refuses_pending_and_unknown_states(data_dir: Path) -> None:
    for state in ("received", "sent", "pending", "all"):
        with pytest.raises(QueueError, match="never purged"):
            admin.purge(data_dir, state)
    assert admin.queue_stats(data_dir)["pending"] == 3


def test_missing_queue_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QueueError, match="no queue database"):
        admin.queue_stats(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


async def test_admin_works_beside_a_running_agent(tmp_path: Path) -> None:
    queue = DurableQueue(admin.queue_path(tmp_path))
    await queue.open()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(queue.submit_wait(record(str(i))) for i in range(20))), 10
        )
        assert all(r.ok for r in results)
        stats = admin.queue_stats(tmp_path)
        assert stats["pending"] == 20 and stats["lease"]["holder"] == queue.holder
        batch = await asyncio.wait_for(queue.next_batch(20), 10)
        queue.confirm([m.row_id for m in batch])
        for _ in range(200):
            if admin.queue_stats(tmp_path)["states"]["confirmed"] == 20:
                break
            await asyncio.sleep(0.01)
        assert admin.purge(tmp_path, "confirmed") == 20
        assert (await queue.submit_wait(record("after-purge"))).row_id == 21
    finally:
        await queue.close()
    assert admin.queue_stats(tmp_path)["lease"] is None


def test_stats_count_spool_bytes_referenced_and_on_disk(tmp_path: Path) -> None:
    spool = tmp_path / "spool" / "pacs"
    spool.mkdir(parents=True)
    (spool / "a.dcm").write_bytes(b"a" * 3000)
    (spool / "orphan.dcm").write_bytes(b"o" * 500)
    store = QueueStore(admin.queue_path(tmp_path))
    rec = InboundRecord("pacs", "127.0.0.1:1", "MODALITY", "1.2.3", "CT", b"{}", time.time(),
                        "application/dicom", FilePayload("spool/pacs/a.dcm", 3000, "ab" * 32))
    assert store.insert_batch([rec], [DuplicatePolicy.FLAG])[0].ok
    store.close()
    stats = admin.queue_stats(tmp_path)
    assert (stats["spool_files"], stats["spool_bytes"], stats["spool_disk_bytes"]) == (1, 3000, 3500)
    assert stats["free_bytes"] > 0
