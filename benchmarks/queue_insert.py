"""Cost of the queue's hot-path commit: ``QueueStore.insert_batch`` rows per second.

What is measured
----------------
A fresh queue database (``durability="normal"``, as the agent's fast mode runs it) in a temporary
directory; ``groups`` group commits of ``group`` records each, the 625-byte ADT^A01 of the
performance targets (``tests/data/adt_a01.hl7``) with a unique MSH-10 per record and the
``FLAG`` duplicate policy (so every group also runs the de-duplication lookup). Reported: rows/s
and CPU microseconds per row over all groups, best of ``repeat`` runs (the machine is shared, so the
best run is the least disturbed one). WAL checkpoints are left to SQLite's autocheckpoint, as
in the store alone; the agent moves them to a thread.

Used to price the content digest of the dedup key (issue 13, defect 3): compare with the store
before it in one sitting, runs alternating so both see the same machine load::

    git show <rev>:medagent/queue/store.py > /tmp/old_store.py
    python benchmarks/queue_insert.py --compare /tmp/old_store.py --group 10 --repeat 7

Use: ``python benchmarks/queue_insert.py [--group 10] [--groups 2000] [--repeat 5] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from store_module import load_store

from medagent.queue.records import DuplicatePolicy, InboundRecord

CORPUS_MESSAGE = Path(__file__).resolve().parent.parent / "tests" / "data" / "adt_a01.hl7"


def _records(template: bytes, count: int, start: int) -> list[InboundRecord]:
    now = time.time()
    return [
        InboundRecord("adt-in", "127.0.0.1:40000", "LAB^NORTH", f"{start + i:015d}", "ADT^A01",
                      template.replace(b"MSG000000000001", f"{start + i:015d}".encode()), now)
        for i in range(count)
    ]


def run(store_module: ModuleType, group: int, groups: int) -> float:
    """CPU seconds per row for ``groups`` commits of ``group`` records in a fresh database.

    Process CPU time, not wall time: on a shared machine other processes' load stretches wall
    time far more than it changes the work done (``durability="normal"`` never waits for a disk)."""
    template = CORPUS_MESSAGE.read_bytes()
    batches = [_records(template, group, g * group) for g in range(groups)]
    policies = [DuplicatePolicy.FLAG] * group
    with tempfile.TemporaryDirectory() as tmp:
        store = store_module.QueueStore(Path(tmp) / "queue.sqlite3")
        try:
            started = time.process_time()
            for batch in batches:
                results = store.insert_batch(batch, policies)
                if results[0].error is not None:
                    raise RuntimeError(results[0].error)
            elapsed = time.process_time() - started
        finally:
            store.close()
    return elapsed / (group * groups)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--group", type=int, default=10, help="records per commit (default 10)")
    parser.add_argument("--groups", type=int, default=2000, help="commits per run (default 2000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is reported (default 5)")
    parser.add_argument("--store", help="path of another store.py to measure instead of the current one")
    parser.add_argument("--compare", metavar="STORE_PY",
                        help="also measure this store.py, alternating runs with the current one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    candidates = {args.store or "current": load_store(args.store)}
    if args.compare:
        candidates[args.compare] = load_store(args.compare)
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(max(1, args.repeat)):  # alternate, so both see the same machine load
        for name, module in candidates.items():
            best[name] = min(best[name], run(module, args.group, args.groups))
    results = [{"store": name, "group": args.group, "groups": args.groups,
                "us_per_row": round(seconds * 1e6, 2), "rows_per_s": round(1 / seconds)}
               for name, seconds in best.items()]
    for result in results:
        print(json.dumps(result) if args.json else
              f"{result['store']}: group {args.group}: {result['us_per_row']} us/row, {result['rows_per_s']} rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
