"""Hub scale-out (issue 20, docs/scale-out.md): one vs two `medagent hub` processes on PostgreSQL,
and the cost of a `$push` routed through Redis.

What is measured
----------------
* Inbound msg/s: ``--conns`` agent websockets (the closed-loop load of benchmarks/hub_store.py:
  ``agent:batch`` frames of ``--batch`` ADT messages, each batch's responses awaited before the
  next) into one hub process, then split evenly between two hub processes that share the same
  PostgreSQL (started here: initdb, fsync on) and Redis (``--bus``). Hub CPU is the sum over the
  hub processes (µs per message, from /proc).
* One routed ``$push`` (``waitForResponse``): HTTP to hub 2 -> Redis -> hub 1 -> the agent's
  websocket (a test agent answering at once) and back, sequentially ``--pushes`` times; p50/p99
  in ms, next to the same call made on hub 1 itself (no Redis).

Bounds: every wait has a timeout; the hub processes, PostgreSQL and Redis this script starts are
stopped by their PID. On a 2-core machine shared with the load generator the point is the shape
(what a second process adds, what a hop through Redis costs), not the absolute figure.

Use: ``python benchmarks/hub_scaleout.py [--conns 4] [--batch 50] [--duration 10] [--pushes 300] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent / "tests")]

from engines.postgres import PostgresServer
from engines.redis_server import RedisServer
from hub_store import ACK_BOT, TIMEOUT_S, _agent, _cpu_s, agent_socket

_LISTENING = re.compile(rb"medagent hub listening on http://127\.0\.0\.1:(\d+)")


class Hub:
    """One `medagent hub serve` process on the shared store and bus."""

    def __init__(self, data_dir: Path, store: str, bus: str) -> None:
        self.data_dir = data_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "medagent", "hub", "serve", "--data-dir", str(data_dir), "--store", store,
             "--bus", bus, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + TIMEOUT_S
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if match := _LISTENING.search(line):
                self.port = int(match.group(1))
                break
            if not line and self.process.poll() is not None:
                raise RuntimeError("the hub process ended before listening")
        else:
            raise RuntimeError("the hub did not start in time")
        self.admin_token = (data_dir / "admin-token").read_text().strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(TIMEOUT_S)


async def _make_agents(store_url: str, count: int, tmp: Path) -> list[list[str]]:
    from medagent.hub.store import open_store

    store = await open_store(store_url, tmp)
    try:
        agents = []
        for n in range(count):
            c = await store.add_agent(f"bench-{uuid.uuid4().hex[:8]}-{n}")
            await store.add_channel(c.agent_id, "adt", "mllp://0.0.0.0:2575", ACK_BOT)
            agents.append([c.agent_id, c.client_id, c.client_secret])
        return agents
    finally:
        await store.close()


async def inbound(hubs: list[Hub], agents: list[list[str]], batch: int, warmup: float, duration: float,
                  tag: str) -> dict[str, Any]:
    counter, stop = [0], asyncio.Event()
    tasks = [asyncio.create_task(_agent(hubs[i % len(hubs)].port, creds, batch, counter, stop, f"{tag}{i}-"))
             for i, creds in enumerate(agents)]
    await asyncio.sleep(warmup)
    pids = [h.process.pid for h in hubs]
    start_count, start_cpu, start = counter[0], sum(map(_cpu_s, pids)), time.perf_counter()
    await asyncio.sleep(duration)
    done, cpu = counter[0] - start_count, sum(map(_cpu_s, pids)) - start_cpu
    elapsed = time.perf_counter() - start
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)
    return {"hub_processes": len(hubs), "conns": len(agents), "batch": batch, "msgs_per_s": round(done / elapsed),
            "hub_cpu_us_per_msg": round(cpu / max(done, 1) * 1e6, 1)}


async def _answering_agent(port: int, creds: list[str], ready: asyncio.Event, stop: asyncio.Event) -> None:
    """A connected agent that answers every transmit request at once."""
    async with agent_socket(port, creds) as ws:
        while not stop.is_set():
            try:
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), 0.5))
            except TimeoutError:
                continue
            kind = frame.get("type")
            if kind == "agent:connect:response":
                ready.set()
            elif kind == "agent:transmit:request":
                await ws.send(orjson.dumps({"type": "agent:transmit:response", "callback": frame["callback"],
                                            "remote": frame["remote"], "contentType": frame["contentType"],
                                            "statusCode": 200, "body": "MSA|AA|1"}))
            elif kind == "agent:heartbeat:request":
                await ws.send(orjson.dumps({"type": "agent:heartbeat:response", "version": "bench"}))


async def push_latency(holder: Hub, caller: Hub, creds: list[str], count: int) -> dict[str, Any]:
    ready, stop = asyncio.Event(), asyncio.Event()
    agent = asyncio.create_task(_answering_agent(holder.port, creds, ready, stop))
    await asyncio.wait_for(ready.wait(), TIMEOUT_S)
    body = {"destination": "mllp://10.0.0.9:2575", "contentType": "x-application/hl7-v2+er7", "body": "MSH|^~\\&|x",
            "waitForResponse": True, "waitTimeout": 5000}
    headers = {"Authorization": f"Bearer {caller.admin_token}"}
    url = f"http://127.0.0.1:{caller.port}/Agent/{creds[0]}/$push"
    times: list[float] = []
    async with aiohttp.ClientSession() as http:
        for n in range(count + 20):  # the first 20 warm up connections and caches
            start = time.perf_counter()
            async with http.post(url, json=body, headers=headers) as response:
                await response.read()
                assert response.status == 200, response.status
            if n >= 20:
                times.append((time.perf_counter() - start) * 1000)
    stop.set()
    await asyncio.wait_for(agent, TIMEOUT_S)
    times.sort()
    return {"routed": holder is not caller, "pushes": count, "p50_ms": round(statistics.median(times), 2),
            "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=4, help="agent websockets (split between the hubs)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--pushes", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medagent-hub-scaleout-") as tmp_text:
        tmp = Path(tmp_text)
        pg, redis = PostgresServer(fsync=True), RedisServer(tmp / "redis")
        hubs: list[Hub] = []
        try:
            pg.start()
            redis.start()
            for processes in (1, 2):
                store = pg.create_database()
                bus = f"{redis.url}?cluster={uuid.uuid4().hex}"
                agents = asyncio.run(_make_agents(store, args.conns + 1, tmp))
                hubs = [Hub(tmp / f"run{processes}-h{i}", store, bus) for i in range(processes)]
                results.append(asyncio.run(inbound(hubs, agents[:-1], args.batch, args.warmup, args.duration,
                                                   f"p{processes}")))
                if processes == 2:
                    for caller in (hubs[0], hubs[1]):
                        results.append(asyncio.run(push_latency(hubs[0], caller, agents[-1], args.pushes)))
                for hub in hubs:
                    hub.stop()
                hubs = []
        finally:
            for hub in hubs:
                hub.stop()
            redis.stop()
            pg.stop()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "msgs_per_s" in r:
                print(f"inbound  hub processes={r['hub_processes']}  conns={r['conns']}  batch={r['batch']}  "
                      f"{r['msgs_per_s']:8,} msg/s  hub CPU {r['hub_cpu_us_per_msg']:7.1f} µs/msg")
            else:
                where = "hub 2 -> Redis -> hub 1" if r["routed"] else "hub 1 (local)        "
                print(f"$push    {where}  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  ({r['pushes']} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
