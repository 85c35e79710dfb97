"""Measure what hub retention costs intake, and how many bytes a stored message takes.

Not a test (no timing assertions in tests): run by hand, prints figures for docs/hub.md.

    python tests/hub/measure_retention.py [--old 200000] [--seconds 15]

1. Preloads ``--old`` messages received 100 days ago (past every limit) into a fresh hub.
2. Runs a real websocket agent sending agent:batch frames of 200 ADT^A01 (ack bot) for
   ``--seconds`` while retention deletes the old rows in steps of ``retention_batch_rows``.
3. Reports messages/s, the longest event-loop stall seen by a 1 ms probe, retention's longest
   step, and bytes per message (live pages of hub.sqlite3 / rows) — with and without retention.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hubtest import SpecAgent, adt, hub_settings, transmit

from medagent.hub import HubServer
from medagent.hub.records import IncomingMessage, RetentionPolicy
from medagent.hub.store import now_ms

BATCH = 200


async def lag_probe(stop: asyncio.Event, worst: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        start = loop.time()
        await asyncio.sleep(0.001)
        worst[0] = max(worst[0], loop.time() - start - 0.001)


async def run(old: int, seconds: float, retention_on: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        policy = RetentionPolicy(max_age_s=30 * 86400, body_max_age_s=7 * 86400) if retention_on else RetentionPolicy(None, None)
        settings = hub_settings(Path(tmp), retention=policy, retention_interval_s=0.5, bot_timeout_s=10.0)
        async with HubServer(settings) as hub:
            credentials = await hub.store.add_agent("bench")
            await hub.store.add_channel(credentials.agent_id, "adt", "mllp://0.0.0.0:2575")
            stamp = now_ms() - 100 * 86_400_000
            for start in range(0, old, 1000):
                await hub.store.store_incoming([
                    IncomingMessage(credentials.agent_id, "adt", "r", f"old-{i}", "x-application/hl7-v2+er7",
                                    adt(f"O{i}"), stamp) for i in range(start, min(old, start + 1000))])
            client = await SpecAgent.connected(hub, credentials)
            stop, worst = asyncio.Event(), [0.0]
            probe = asyncio.create_task(lag_probe(stop, worst))
            sent = 0
            began = time.perf_counter()
            seq = 0
            while time.perf_counter() - began < seconds:
                seq += 1
                frames = [transmit("adt", adt(f"N{sent + i}"), f"new-{sent + i}") for i in range(BATCH)]
                await client.send({"type": "agent:batch", "seq": seq, "messages": frames})
                await client.responses(BATCH, timeout=30)
                sent += BATCH
            elapsed = time.perf_counter() - began
            stop.set()
            await probe
            await client.close()
            stats = hub.retention.stats
            rows = await hub.store.count_rows("messages")
            print(f"retention {'on ' if retention_on else 'off'}: {sent / elapsed:8.0f} msg/s round trip,"
                  f" worst loop stall {worst[0] * 1000:6.1f} ms, retention longest step"
                  f" {stats.longest_step_s * 1000:5.1f} ms (mean {stats.step_time_s / max(stats.steps, 1) * 1000:4.1f} ms"
                  f" over {stats.steps} steps), deleted {stats.messages_deleted} old rows,"
                  f" {rows} rows left, {await hub.store.live_bytes() / max(rows, 1):6.0f} bytes/message")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    for retention_on in (False, True):
        asyncio.run(run(args.old, args.seconds, retention_on))


if __name__ == "__main__":
    main()
