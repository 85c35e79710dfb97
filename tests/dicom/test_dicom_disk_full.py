"""Disk full on the agent's spool: a real, small tmpfs (root only). C-STOREs that do not fit are
answered 0xA700 with a reason, nothing half-written stays, earlier instances are intact, and
the channel stores again as soon as there is room (no restart)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from dicomtest import QueueSink, ct_dataset, scu_store, start_channel

from medagent.dicom.files import digest_file
from medagent.queue import DurableQueue

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                                reason="mounting a tmpfs needs root")


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    spool = tmp_path / "agent" / "spool"
    spool.mkdir(parents=True, mode=0o700)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k,mode=0700", "tmpfs", str(spool)],
                            capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], capture_output=True, timeout=30, check=False)


@pytest.fixture
async def queue(tmp_path: Path, small_spool: Path) -> AsyncIterator[DurableQueue]:
    q = DurableQueue(tmp_path / "agent" / "queue.db")
    await q.open()
    try:
        yield q
    finally:
        await q.close()


async def test_spool_full_answers_a700_then_recovers(tmp_path: Path, small_spool: Path, queue: DurableQueue) -> None:
    sink = QueueSink(queue)
    channel = await start_channel(tmp_path / "agent", sink)
    try:
        # 512x512x2 bytes = 512 KiB each: the 1600 KiB spool holds three, not four
        datasets = [ct_dataset(rows=512, columns=512, seed=i) for i in range(4)]
        statuses = await asyncio.to_thread(scu_store, channel.port, datasets)
        assert statuses[:3] == [0, 0, 0] and statuses[3] == 0xA700
        assert len(list((small_spool / "pacs").iterdir())) == 3  # the partial copy was removed
        assert channel.stats()["answers"] == {"0x0000": 3, "0xA700": 1}

        await asyncio.to_thread(subprocess.run, ["mount", "-o", "remount,size=8m", str(small_spool)],
                                check=True, timeout=30)
        assert await asyncio.to_thread(scu_store, channel.port, [datasets[3]]) == [0]
    finally:
        await channel.stop()
    rows = await queue.next_batch(10)
    assert [r.control_id for r in rows] == [d.SOPInstanceUID for d in datasets]
    for row in rows:  # every Success-answered instance is on disk, complete
        assert row.file is not None
        assert digest_file(tmp_path / "agent" / row.file.path) == (row.file.size, row.file.sha256)
