"""The SQLite hub store's hot-path round alone: CPU and WAL bytes per stored message (issue 19).

What is measured
----------------
:meth:`SqliteCore.write_round` driven the way the hub's StoreWriter drives it, in this process,
without sockets or an event loop: each round inserts a group of ``--batch`` new messages with
their results (the round's ``Answer``, as for the built-in ACK bot), on index sets of the
messages table as a running hub has them (the dashboard, always served, adds its own at start):

* ``v3``: schema v3's indexes (the retention pair ``messages_channel_age`` and the partial
  ``messages_channel_body_age``) and the dashboard's indexes before v5;
* ``v4``: schema v4 (one ``messages_retention`` index) and the dashboard's indexes before v5
  (``dashboard_messages_agent_time (agent_id, received_at, channel)`` and the partial index of
  failures);
* ``v5``: the current schema and the dashboard's current indexes (no index on time).

``--shapes`` picks which (default ``v4,v5``).

Per shape: CPU per message (``time.process_time`` over the rounds, the commits included; WAL
checkpoints are off, as on the hub's writer connection), WAL bytes per message (the growth of
``hub.sqlite3-wal``: pages written per message times the page size plus frame headers) and
database bytes per message (after a checkpoint). The shapes run in alternating pairs
(``--pairs``), each on a fresh database in a temporary directory, so drift on a shared machine
hits both alike.

``--engine postgresql`` runs the same rounds through :class:`PostgresHubStore` against a
PostgreSQL this script starts (initdb in a temporary directory, fsync on): CPU is this process's
plus the server's processes' (from /proc), WAL bytes the ``pg_current_wal_lsn()`` advance, and
database bytes ``pg_total_relation_size('messages')`` (table, TOAST and indexes).

Use: ``python benchmarks/hub_round.py [--engine sqlite|postgresql] [--batch 1,25,250] [--messages 20000]
[--pairs 5] [--shapes v4,v5] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from medagent.hub.dashboard.queries import INDEXES as DASHBOARD_INDEXES
from medagent.hub.records import IncomingMessage, MessageResult, MessageStatus, StoredReply
from medagent.hub.schema import PG_TYPES, SQLITE_TYPES, statements
from medagent.hub.store.sqlite import SqliteCore

ROOT = Path(__file__).resolve().parent.parent


#: the dashboard's index on time, created by dashboards before schema v5
PRE_V5_DASHBOARD = "CREATE INDEX dashboard_messages_agent_time ON messages (agent_id, received_at, channel)"


def shape_statements(shape: str, types: dict[str, str]) -> tuple[str, ...]:
    """What turns a fresh current database (with the dashboard's current indexes) into ``shape``."""
    v3 = ("DROP INDEX messages_retention", *statements(1, types)[2:])  # v2's two retention indexes
    return {"v3": (*v3, PRE_V5_DASHBOARD), "v4": (PRE_V5_DASHBOARD,), "v5": ()}[shape]

BODY = ("MSH|^~\\&|ADT1|HOSP|MEDAGENT|CLOUD|20240101120000||ADT^A01^ADT_A01|{cid}|P|2.5.1\r"
        "EVN|A01|20240101120000\rPID|1||{cid}^^^HOSP^MR||DOE^JOHN^Q||19800102|M|||1 MAIN ST^^TOWN^ST^12345\r"
        "PV1|1|I|WARD^1^A\r")
REPLY = StoredReply("MSH|^~\\&|MEDAGENT|CLOUD|ADT1|HOSP|20240101120000||ACK^A01^ACK|X|P|2.5.1\rMSA|AA|X\r",
                    "x-application/hl7-v2+er7", 200)
AGENT = "0b6a3c1e-6a57-4bde-9d3e-2d4f5c6b7a88"


def group(round_no: int, batch: int) -> list[IncomingMessage]:
    """``batch`` new messages with agent-style callbacks (a fixed prefix, then random-looking)."""
    return [IncomingMessage(
        agent_id=AGENT, channel="adt", remote="10.0.0.1:5000",
        callback=f"Agent/{AGENT}-{(round_no * 7919 + i) * 2654435761 % 2**64:016x}-{round_no}-{i}",
        content_type="x-application/hl7-v2+er7", body=BODY.format(cid=f"C{round_no}-{i}"),
        received_at=1_700_000_000_000 + round_no, control_id=f"C{round_no}-{i}", message_type="ADT^A01",
    ) for i in range(batch)]


def run(shape: str, batch: int, rounds: int) -> tuple[float, float, float]:
    """(CPU µs, WAL bytes, database bytes) per message of ``rounds`` rounds on ``shape``'s indexes."""
    with tempfile.TemporaryDirectory(prefix="medagent-hub-round-") as tmp:
        core = SqliteCore(Path(tmp))
        for statement in (*DASHBOARD_INDEXES, *shape_statements(shape, SQLITE_TYPES)):
            core._conn().execute(statement)
        core.disable_autocheckpoint()
        groups = [group(n, batch) for n in range(rounds)]
        wal = core.path.with_name(core.path.name + "-wal")
        core._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db_before = core.path.stat().st_size
        start = time.process_time()
        for messages in groups:
            results = [MessageResult(m.callback, MessageStatus.PROCESSED, REPLY, None, m.received_at) for m in messages]
            core.write_round([messages], (), [results.__getitem__])
        cpu = time.process_time() - start
        wal_bytes = wal.stat().st_size
        core._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db_bytes = core.path.stat().st_size - db_before
        core.close()
    messages_total = batch * rounds
    return cpu / messages_total * 1e6, wal_bytes / messages_total, db_bytes / messages_total


def _tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and every process below it."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)], times[int(entry)] = int(fields[1]), (int(fields[11]) + int(fields[12]))
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier += children
    return sum(times.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


async def _pg_rounds(url: str, server_pid: int, shape: str, batch: int, rounds: int) -> tuple[float, float, float]:
    import psycopg

    from medagent.hub.store.postgres import PostgresHubStore

    store = await PostgresHubStore.open(url)
    groups = [group(n, batch) for n in range(rounds)]
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in (*DASHBOARD_INDEXES, *shape_statements(shape, PG_TYPES)):
            conn.execute(statement)
        conn.execute("CHECKPOINT")
        lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        start, server_start = time.process_time(), _tree_cpu_s(server_pid)
        for messages in groups:
            results = [MessageResult(m.callback, MessageStatus.PROCESSED, REPLY, None, m.received_at) for m in messages]
            await store.write_round([messages], (), [results.__getitem__])
        cpu = time.process_time() - start + _tree_cpu_s(server_pid) - server_start
        wal_bytes, db_bytes = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s),"
                                           " pg_total_relation_size('messages')", (lsn,)).fetchone()  # type: ignore[misc]
    await store.close()
    messages_total = batch * rounds
    return cpu / messages_total * 1e6, float(wal_bytes) / messages_total, float(db_bytes) / messages_total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--batch", default="1,25,250", help="messages per round, comma-separated")
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run (rounds = messages / batch)")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--shapes", default="v4,v5", help="index sets compared in alternation (v3, v4, v5)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    server = None
    if args.engine == "postgresql":
        sys.path.insert(0, str(ROOT / "tests"))
        from engines.postgres import PostgresServer

        server = PostgresServer(fsync=True)
        server.start()
    try:
        return _compare(args, server)
    finally:
        if server is not None:
            server.stop()


def _compare(args: argparse.Namespace, server: Any) -> int:
    report = []
    for batch in (int(b) for b in args.batch.split(",")):
        rounds = max(1, args.messages // batch)
        figures: dict[str, list[tuple[float, float, float]]] = {shape: [] for shape in args.shapes.split(",")}
        for _ in range(args.pairs):
            for shape, runs in figures.items():
                if server is None:
                    runs.append(run(shape, batch, rounds))
                else:
                    runs.append(asyncio.run(_pg_rounds(server.create_database(), server.pid, shape, batch, rounds)))
        for shape, runs in figures.items():
            report.append({"engine": args.engine, "shape": shape, "batch": batch, "rounds": rounds,
                           "cpu_us_per_msg": round(statistics.median(r[0] for r in runs), 1),
                           "wal_bytes_per_msg": round(statistics.median(r[1] for r in runs)),
                           "db_bytes_per_msg": round(statistics.median(r[2] for r in runs)),
                           "cpu_runs": [round(r[0], 1) for r in runs]})
            if not args.json:
                s = report[-1]
                print(f"{args.engine} {shape}  batch={batch:4}  CPU {s['cpu_us_per_msg']:6.1f} µs/msg  WAL {s['wal_bytes_per_msg']:6,} B/msg"
                      f"  db {s['db_bytes_per_msg']:5,} B/msg  runs {s['cpu_runs']}", flush=True)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
