"""The durable queue's intake path as one lock-step sender drives it: one record per group commit.

Why: at one sender nothing can be grouped, so every message pays a whole group commit (BEGIN,
dedup lookup, INSERT, COMMIT) plus the queue's Python around it; this isolates that cost from the
sockets, the link and the hub. A consumer task takes committed rows and confirms them every 10 ms,
as the dispatcher and the hub's batch acks do. Prints CPU and wall time per message (the process's
CPU, so the WAL checkpointer thread is included).

    python benchmarks/queue_lockstep.py --messages 5000
    # instruction counts, steadier than time on a shared machine (difference of two sizes):
    valgrind --tool=callgrind --callgrind-out-file=/tmp/q500 python benchmarks/queue_lockstep.py --messages 500
    valgrind --tool=callgrind --callgrind-out-file=/tmp/q2500 python benchmarks/queue_lockstep.py --messages 2500

Figures: benchmarks/perf-log.md.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import uvloop

from medagent.queue.durable import DurableQueue
from medagent.queue.records import DuplicatePolicy, InboundRecord

BODY = b"MSH|^~\\&|LAB|NORTH|HIS|MAIN|20261130120000||ADT^A01|0|P|2.5\r" + b"PID|1||12345^^^MRN||DOE^JOHN\r" * 20


async def run(messages: int, directory: Path) -> tuple[float, float]:
    queue = DurableQueue(directory / "queue.sqlite3")
    await queue.open()
    loop = asyncio.get_running_loop()

    async def consume() -> None:
        while True:
            rows = await queue.next_batch(1000)
            await asyncio.sleep(0.01)
            queue.confirm([row.row_id for row in rows])

    consumer = asyncio.ensure_future(consume())
    try:
        for warm_up in (True, False):  # the first round warms caches and the WAL file
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(messages):
                done: asyncio.Future[object] = loop.create_future()
                record = InboundRecord("adt", "127.0.0.1:40000", "LAB^NORTH", f"{warm_up}-{i}", "ADT^A01", BODY,
                                       time.time())
                queue.submit(record, done.set_result, DuplicatePolicy.FLAG)
                await done
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        consumer.cancel()
        await queue.close()
    return cpu / messages * 1e6, wall / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        cpu_us, wall_us = uvloop.run(run(args.messages, Path(directory)))  # the agent's loop
    print(f"{args.messages} messages, one per group: {cpu_us:.1f} CPU µs/msg, {wall_us:.1f} wall µs/msg")


if __name__ == "__main__":
    main()
