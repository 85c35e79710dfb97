"""The SQLite hub store's hot-path round alone: CPU and WAL bytes per stored message (issue 19).

What is measured
----------------
:meth:`SqliteCore.write_round` driven the way the hub's StoreWriter drives it at one sender, in
this process, without sockets or an event loop, for two shapes of the same work:

* ``two-write``: each round inserts a group of ``--batch`` new messages and records the results
  (reply, status) of the previous group with an UPDATE by callback (the shape before the round's
  ``Answer``: results deferred to the next round);
* ``one-write``: each round inserts a group with its results, given by the round's ``Answer``
  (the shape the intake uses for inline bots such as the built-in ACK bot).

Per shape: CPU per message (``time.process_time`` over the rounds, the commits included; WAL
checkpoints are off, as on the hub's writer connection) and WAL bytes per message (the growth of
``hub.sqlite3-wal``: pages written per message times the page size plus frame headers). The
shapes run in alternating pairs (``--pairs``), each on a fresh database in a temporary directory,
so drift on a shared machine hits both alike.

Use: ``python benchmarks/hub_round.py [--batch 25] [--rounds 800] [--pairs 5] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from medagent.hub.records import IncomingMessage, MessageResult, MessageStatus, StoredReply
from medagent.hub.store.sqlite import SqliteCore

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


def run(shape: str, batch: int, rounds: int) -> tuple[float, float]:
    """(CPU µs per message, WAL bytes per message) of ``rounds`` rounds of ``shape``."""
    with tempfile.TemporaryDirectory(prefix="medagent-hub-round-") as tmp:
        core = SqliteCore(Path(tmp))
        core.disable_autocheckpoint()
        groups = [group(n, batch) for n in range(rounds)]
        wal = core.path.with_name(core.path.name + "-wal")
        wal_before = wal.stat().st_size if wal.exists() else 0
        previous: list[MessageResult] = []
        start = time.process_time()
        for messages in groups:
            results = [MessageResult(m.callback, MessageStatus.PROCESSED, REPLY, None, m.received_at) for m in messages]
            if shape == "two-write":
                core.write_round([messages], previous)
                previous = results
            else:
                core.write_round([messages], (), [results.__getitem__])
        if previous:
            core.write_round((), previous)
        cpu = time.process_time() - start
        wal_bytes = wal.stat().st_size - wal_before
        core.close()
    messages_total = batch * rounds
    return cpu / messages_total * 1e6, wal_bytes / messages_total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=25, help="messages per round (the agent's frame)")
    parser.add_argument("--rounds", type=int, default=800)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures: dict[str, list[tuple[float, float]]] = {"two-write": [], "one-write": []}
    for _ in range(args.pairs):
        for shape, runs in figures.items():
            runs.append(run(shape, args.batch, args.rounds))
    summary = {shape: {"cpu_us_per_msg": round(statistics.median(c for c, _ in runs), 1),
                       "wal_bytes_per_msg": round(statistics.median(w for _, w in runs)),
                       "cpu_runs": [round(c, 1) for c, _ in runs]} for shape, runs in figures.items()}
    if args.json:
        print(json.dumps({"batch": args.batch, "rounds": args.rounds, **summary}, indent=2))
    else:
        for shape, s in summary.items():
            print(f"{shape:9}  batch={args.batch:4}  CPU {s['cpu_us_per_msg']:6.1f} µs/msg"
                  f"  WAL {s['wal_bytes_per_msg']:6,} B/msg  runs {s['cpu_runs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
