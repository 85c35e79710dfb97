"""Child process of test_large_instance.py: the agent side of a large C-STORE, measured.

Runs a dicom channel on a real queue, prints ``{"port": N}``, resets the peak-RSS counter
(``/proc/self/clear_refs`` 5), waits (bounded) for the instance to be committed, uploads it to
the hub with the registered uploader, and prints the peak RSS growth in bytes.
Arguments: data_dir hub_url admin_token.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dicomtest import QueueSink, start_channel

from medagent.channels.base import file_uploader
from medagent.queue import DurableQueue
from medagent.records import DICOM_CONTENT_TYPE

WAIT_S = 300.0


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


class Hub:
    def __init__(self, url: str, token: str) -> None:
        self.base_url, self.ssl_context, self._token = url, None, token

    async def authorization(self) -> str:
        return f"Bearer {self._token}"


async def main(data_dir: Path, hub_url: str, token: str) -> None:
    queue = DurableQueue(data_dir / "queue.db")
    await queue.open()
    channel = await start_channel(data_dir, QueueSink(queue))
    uploader = file_uploader(DICOM_CONTENT_TYPE)
    assert uploader is not None
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = peak_rss()
        print(json.dumps({"port": channel.port}), flush=True)
        [message] = await asyncio.wait_for(queue.next_batch(1), WAIT_S)
        assert message.file is not None
        body, _ = await asyncio.wait_for(uploader(Hub(hub_url, token), data_dir / message.file.path,
                                                  message.file, message.body), WAIT_S)
        queue.confirm([message.row_id])
        print(json.dumps({"peak_growth": peak_rss() - before, "size": message.file.size,
                          "transmit_bytes": len(body)}), flush=True)
    finally:
        await channel.stop()
        await queue.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
