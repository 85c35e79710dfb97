"""How fast the dashboard's pages load with 100 agents and 1 million stored messages.

``python benchmarks/dashboard_load.py [--messages 1000000] [--agents 100] [--keep DIR]``

1. builds a hub store in a temporary directory: ``--agents`` agents (2 channels each) through
   :class:`medagent.hub.store.sqlite.SqliteCore`, then ``--messages`` ADT^A01 rows spread over the last
   30 days (``--span-hours``; 1 % failed), bulk-inserted with ``executemany`` in one transaction per 100,000 rows;
2. starts a real :class:`medagent.hub.HubServer` on 127.0.0.1:0 over it (timing the start, which
   includes the dashboard's one-off ``CREATE INDEX IF NOT EXISTS``), logs in with the admin token;
3. times, over real HTTP, the first (cold) load of each page and then the median and max of
   ``--repeat`` further loads: the agents overview ``/dashboard/`` (the first page), the
   messages page (newest 50), failed messages, a control-id search, one agent's page, and the
   first event-stream snapshot of the overview and of one agent.

Prints a table, or one JSON document with ``--json``. Target (issue 17): first page < 300 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from medagent.hub import HubServer, HubSettings

from medagent.hub.store.sqlite import SqliteCore

BODY = ("MSH|^~\\&|ADT1|HOSP|MEDAGENT|CLOUD|20240101120000||ADT^A01^ADT_A01|{cid}|P|2.5.1\r"
        "EVN|A01|20240101120000\rPID|1||{mrn}^^^HOSP^MR||DOE^JOHN^Q||19800102|M|||1 MAIN ST^^TOWN^ST^12345\r"
        "PV1|1|I|WARD^1^A\r")
ACK = "MSH|^~\\&|MEDAGENT|CLOUD|ADT1|HOSP|20240101120000||ACK^A01^ACK|{cid}|P|2.5.1\rMSA|AA|{cid}\r"
CHUNK = 100_000


def build_store(data_dir: Path, agents: int, messages: int, span_hours: float) -> tuple[list[str], float]:
    started = time.perf_counter()
    store = SqliteCore(data_dir)
    agent_ids = []
    for n in range(agents):
        credentials = store.add_agent(f"site-{n:03d}")
        agent_ids.append(credentials.agent_id)
        store.add_channel(credentials.agent_id, "adt-in", f"mllp://0.0.0.0:{2575 + n}")
        store.add_channel(credentials.agent_id, "lab-in", f"astm://0.0.0.0:{3575 + n}")
    store.close()
    conn = sqlite3.connect(data_dir / "hub.sqlite3", isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    rng = random.Random(17)
    now_ms = int(time.time() * 1000)
    span_ms = int(span_hours * 3_600_000)
    for start in range(0, messages, CHUNK):
        rows = []
        for i in range(start, min(messages, start + CHUNK)):
            received = now_ms - span_ms + (span_ms * i) // messages  # ids grow with time, as in a live hub
            cid = f"MSG{i:09d}"
            failed = rng.random() < 0.01
            rows.append((
                agent_ids[i % agents], "adt-in" if i % 3 else "lab-in", "10.1.2.3:50432", f"Agent/bench-{i}", cid,
                "ADT^A01", "x-application/hl7-v2+er7", BODY.format(cid=cid, mrn=i), received,
                "error" if failed else "processed", None if failed else ACK.format(cid=cid),
                None if failed else "x-application/hl7-v2+er7", None if failed else 200,
                "RuntimeError: downstream unavailable" if failed else None, received + rng.randint(1, 40),
            ))
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages (agent_id, channel, remote, callback, control_id, message_type, content_type,"
            " body, received_at, status, reply_body, reply_content_type, reply_status, error, processed_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
    conn.close()
    return agent_ids, time.perf_counter() - started


async def timed(http: aiohttp.ClientSession, url: str, repeat: int) -> dict[str, float]:
    async def once() -> float:
        started = time.perf_counter()
        async with http.get(url, allow_redirects=False) as response:
            await response.read()
            assert response.status == 200, (url, response.status)
        return (time.perf_counter() - started) * 1000

    first = await once()
    rest = [await once() for _ in range(repeat)]
    return {"first_ms": round(first, 1), "median_ms": round(statistics.median(rest), 1), "max_ms": round(max(rest), 1)}


async def first_snapshot(http: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with http.get(url) as response:
        async with asyncio.timeout(30):
            for _ in range(10):
                if (await response.content.readline()).startswith(b"data: "):
                    return round((time.perf_counter() - started) * 1000, 1)
    raise AssertionError("no snapshot")


async def measure(data_dir: Path, agent_ids: list[str], repeat: int) -> dict[str, Any]:
    started = time.perf_counter()
    hub = HubServer(HubSettings(data_dir=data_dir, port=0))
    await hub.start()
    start_s = time.perf_counter() - started
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post(hub.url + "/dashboard/login", data={"password": hub.admin_token},
                                 allow_redirects=False) as response:
                assert response.status == 303, response.status
            pages = {
                "agents overview (first page)": "/dashboard/",
                "messages, newest 50": "/dashboard/messages",
                "failed messages": "/dashboard/messages?status=error",
                "one agent's messages": f"/dashboard/messages?agent={agent_ids[7]}",
                "control-id search": "/dashboard/messages?control_id=MSG000123456",
                "agent page": f"/dashboard/agents/{agent_ids[7]}",
            }
            results = {name: await timed(http, hub.url + path, repeat) for name, path in pages.items()}
            results["overview event snapshot"] = {"first_ms": await first_snapshot(http, hub.url + "/dashboard/events")}
            results["agent event snapshot"] = {
                "first_ms": await first_snapshot(http, hub.url + f"/dashboard/events?agent={agent_ids[7]}")}
    finally:
        await hub.stop()
    return {"hub_start_s": round(start_s, 2), "pages": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--span-hours", type=float, default=720.0,
                        help="spread the messages over this many hours before now (default 30 days;"
                             " 1 = the worst case for the last-hour figures)")
    parser.add_argument("--keep", type=Path, help="build (or reuse) the store in this directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medagent-dashboard-bench-") as tmp:
        data_dir = args.keep or Path(tmp) / "hub"
        if (data_dir / "hub.sqlite3").exists():
            store = SqliteCore(data_dir)
            agent_ids = [a.id for a in store.list_agents()]
            store.close()
            build_s = 0.0
        else:
            agent_ids, build_s = build_store(data_dir, args.agents, args.messages, args.span_hours)
        result = asyncio.run(measure(data_dir, agent_ids, args.repeat))
        result.update(agents=len(agent_ids), messages=args.messages, build_s=round(build_s, 1),
                      db_mb=round((data_dir / "hub.sqlite3").stat().st_size / 2**20, 1))
    if args.json:
        print(orjson.dumps(result).decode())
        return 0
    print(f"{result['agents']} agents, {result['messages']:,} messages ({result['db_mb']} MiB),"
          f" built in {result['build_s']} s; hub start (incl. dashboard indexes) {result['hub_start_s']} s")
    print(f"{'page':34} {'first ms':>9} {'median ms':>10} {'max ms':>8}")
    for name, figures in result["pages"].items():
        print(f"{name:34} {figures['first_ms']:>9} {figures.get('median_ms', ''):>10} {figures.get('max_ms', ''):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
