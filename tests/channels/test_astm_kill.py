"""kill -9 of the agent right after an ASTM transmission's final ACK: the message is not lost.

A child process runs an ``astm://`` channel over a real DurableQueue (the same wiring as the
runtime: the sink submits to the queue and the final frame's ACK waits for the commit). The test
plays the instrument, gets the final ACK, SIGKILLs the child at once, then opens the queue file
itself: the row is there and pending, so the dispatcher delivers it to the hub after a restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_astm_peers import ACK, RESULT, TcpPeer, send_session

from medagent.queue import DurableQueue
from medagent.records import ASTM_CONTENT_TYPE

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL")

CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from medagent.channels.base import ChannelContext, channel_kind
    from medagent.channels.endpoint import parse_endpoint
    from medagent.queue import DurableQueue

    class Sink:
        def __init__(self, queue):
            self.queue = queue
        def accept(self, record, *, durable, dedup, on_commit):
            self.queue.submit(record, on_commit, dedup)

    async def main():
        queue = DurableQueue(Path(sys.argv[1]))
        await queue.open()
        endpoint = parse_endpoint("astm://127.0.0.1:0")
        kind = channel_kind("astm")
        channel = kind.create("lab", endpoint, kind.parse_options(endpoint),
                              ChannelContext(sink=Sink(queue), data_dir=Path(sys.argv[1]).parent))
        await channel.start()
        print(channel.port, flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
""")


async def test_acked_transmission_survives_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "queue.sqlite"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE, text=True)  # noqa: ASYNC220
    try:
        assert child.stdout is not None
        port = int(await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60))
        peer = await TcpPeer.connect(port)
        assert await send_session(peer, RESULT) == ACK * 6  # the last ACK came after the commit
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        await peer.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    queue = DurableQueue(db)
    await queue.open()  # the dead child's lease is recognised as abandoned
    try:
        rows = await queue.next_batch(10)
        assert len(rows) == 1
        assert rows[0].content_type == ASTM_CONTENT_TYPE
        assert rows[0].body == ("\n".join(RESULT) + "\n").encode()
    finally:
        await queue.close()
