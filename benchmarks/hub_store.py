"""Inbound throughput of one hub on each store engine: SQLite vs PostgreSQL (issue 20, docs/hub-store.md).

What is measured
----------------
One hub process (this script with ``--serve``: a real :class:`HubServer`, the ACK bot on every
channel) takes real agent websocket traffic: ``--conns`` agents, each a websocket that sends
``agent:batch`` frames of ``--batch`` HL7 ADT^A01 messages (about 300 bytes, unique callbacks) and
waits for the batch's ``agent:batch:ack`` and every ``agent:transmit:response`` before it sends
the next (closed loop, as an agent whose window is one batch). So every message crosses the
hub's whole intake path: frame parse, the group commit that stores it before the ack, the bot,
the group commit that records the reply, the response frame.

Reported per scenario: inbound msg/s (responses received in the measured window) and the hub
process's CPU per message (user+system time from /proc, µs/msg; the load clients run in this
process, not the hub's). ``--store`` picks the engines: ``sqlite`` (hub.sqlite3, WAL,
synchronous=NORMAL), ``sqlite-thread`` (the same with the hot-path round on a dedicated writer
thread instead of inline on the event loop), ``postgresql`` (a PostgreSQL this script starts with
initdb in a temporary directory, fsync on, default synchronous_commit; or ``--pg-url``).

Bounds: each scenario runs ``--warmup`` + ``--duration`` seconds, every wait has a timeout, the
hub process and the PostgreSQL server this script starts are stopped by their PID.

Use: ``python benchmarks/hub_store.py [--store sqlite,sqlite-thread,postgresql] [--conns 1,10]
[--batch 50] [--duration 10] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
ADT = ("MSH|^~\\&|ADT1|HOSP|MEDAGENT|CLOUD|20240101120000||ADT^A01^ADT_A01|{cid}|P|2.5.1\r"
       "EVN|A01|20240101120000\rPID|1||{cid}^^^HOSP^MR||DOE^JOHN^Q||19800102|M|||1 MAIN ST^^TOWN^ST^12345\r"
       "PV1|1|I|WARD^1^A\r")
TIMEOUT_S = 30.0
ACK_BOT = "medagent.hub.bots.ack:handler"


# -- the hub process --------------------------------------------------------------------------


async def serve(data_dir: Path, store_url: str | None, writer_thread: bool, agents: int) -> None:
    """Run one hub; print one JSON line (port, agents' credentials), serve until SIGTERM."""
    from medagent.hub import HubServer, HubSettings
    from medagent.hub import server as server_module
    from medagent.hub.store import open_store
    from medagent.hub.store.sqlite import SqliteHubStore

    if writer_thread:  # the variant under comparison: the hot-path round on a writer thread
        async def threaded(url: str | None, directory: Path, *, pool_size: int = 10) -> Any:
            return SqliteHubStore(directory, writer_thread=True)
        server_module.open_store = threaded  # type: ignore[assignment]
    setup = await open_store(store_url, data_dir)
    credentials = []
    for n in range(agents):
        c = await setup.add_agent(f"bench-{n}")
        await setup.add_channel(c.agent_id, "adt", "mllp://0.0.0.0:2575", ACK_BOT)
        credentials.append([c.agent_id, c.client_id, c.client_secret])
    await setup.close()
    hub = HubServer(HubSettings(data_dir=data_dir, store=store_url, port=0, heartbeat_interval_s=60.0,
                                min_free_bytes=0, min_free_percent=0.0))
    await hub.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps({"port": hub.port, "agents": credentials}), flush=True)
    await stop.wait()
    await hub.stop()


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Result:
    store: str
    conns: int
    batch: int
    msgs_per_s: float
    hub_cpu_us_per_msg: float
    messages: int


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@asynccontextmanager
async def agent_socket(port: int, creds: list[str]) -> AsyncIterator[ClientConnection]:
    """An agent's websocket to the hub at ``port``: token by client credentials, then
    ``agent:connect:request`` sent (the caller reads the response)."""
    agent_id, client_id, secret = creds
    async with aiohttp.ClientSession() as http:
        form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
        async with http.post(f"http://127.0.0.1:{port}/oauth2/token", data=form) as response:
            token = (await response.json())["access_token"]
    async with connect(f"ws://127.0.0.1:{port}/ws/agent", max_size=None) as ws:
        await ws.send(orjson.dumps({"type": "agent:connect:request", "accessToken": token, "agentId": agent_id}))
        yield ws


async def _agent(port: int, creds: list[str], batch: int, counter: list[int], stop: asyncio.Event, tag: str) -> None:
    agent_id = creds[0]
    async with agent_socket(port, creds) as ws:
        while orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S)).get("type") != "agent:connect:response":
            pass
        seq = 0
        while not stop.is_set():
            seq += 1
            frames = [{"type": "agent:transmit:request", "accessToken": "x", "channel": "adt", "remote": "10.0.0.1:1",
                       "contentType": "x-application/hl7-v2+er7", "body": ADT.format(cid=f"{tag}{seq}-{i}"),
                       "callback": f"{tag}-{agent_id}-{seq}-{i}"} for i in range(batch)]
            await ws.send(orjson.dumps({"type": "agent:batch", "seq": seq, "messages": frames}))
            answered = 0
            while answered < batch:
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
                items = frame["messages"] if frame.get("type") == "agent:batch" else [frame]
                answered += sum(1 for m in items if m.get("type") == "agent:transmit:response")
            counter[0] += batch


async def measure(store: str, port: int, pid: int, agents: list[list[str]], batch: int, warmup: float,
                  duration: float, tag: str) -> Result:
    counter, stop = [0], asyncio.Event()
    tasks = [asyncio.create_task(_agent(port, creds, batch, counter, stop, tag)) for creds in agents]
    await asyncio.sleep(warmup)
    start_count, start_cpu, start = counter[0], _cpu_s(pid), time.perf_counter()
    await asyncio.sleep(duration)
    done, cpu, elapsed = counter[0] - start_count, _cpu_s(pid) - start_cpu, time.perf_counter() - start
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)
    return Result(store, len(agents), batch, round(done / elapsed), round(cpu / max(done, 1) * 1e6, 1), done)


def run_scenario(store: str, url: str | None, conns: int, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory(prefix="medagent-hub-store-bench-") as tmp:
        command = [sys.executable, __file__, "--serve", "--data-dir", tmp, "--agents", str(conns)]
        if url:
            command += ["--store-url", url]
        if store == "sqlite-thread":
            command.append("--writer-thread")
        hub = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        try:
            assert hub.stdout is not None
            info = json.loads(hub.stdout.readline())
            return asyncio.run(measure(store, info["port"], hub.pid, info["agents"], args.batch, args.warmup,
                                       args.duration, f"{store}{conns}"))
        finally:
            hub.send_signal(signal.SIGTERM)
            try:
                hub.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                hub.kill()
                hub.wait(TIMEOUT_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite,postgresql", help="sqlite, sqlite-thread, postgresql (comma-separated)")
    parser.add_argument("--conns", default="1,10", help="agents (websockets), comma-separated")
    parser.add_argument("--batch", type=int, default=50, help="messages per agent:batch frame")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--pg-url", help="an existing PostgreSQL database (default: start one, fsync on)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--store-url", help=argparse.SUPPRESS)
    parser.add_argument("--writer-thread", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--agents", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.data_dir, args.store_url, args.writer_thread, args.agents))
        return 0
    stores = [s.strip() for s in args.store.split(",") if s.strip()]
    pg = None
    results: list[Result] = []
    try:
        for store in stores:
            for conns in (int(c) for c in args.conns.split(",")):
                url = None
                if store == "postgresql":
                    if args.pg_url:
                        url = args.pg_url
                    else:
                        if pg is None:
                            sys.path.insert(0, str(ROOT / "tests"))
                            from engines.postgres import PostgresServer

                            pg = PostgresServer(fsync=True)
                            pg.start()
                        url = pg.create_database()
                result = run_scenario(store, url, conns, args)
                results.append(result)
                if not args.json:
                    print(f"{result.store:14} conns={result.conns:3} batch={result.batch:4}  "
                          f"{result.msgs_per_s:8,.0f} msg/s  hub CPU {result.hub_cpu_us_per_msg:7.1f} µs/msg", flush=True)
    finally:
        if pg is not None:
            pg.stop()
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
