"""Cost of finding pending rows among many settled ones: ``load_pending`` and ``first_pending_id``.

Why: schema 3 (issue 19) dropped the partial ``messages_pending`` index (a page written by every
commit); pending scans now walk the rowid B-tree from the store's pending floor. This prices those
scans against the indexed store, on the same database content:

* ``tail``: ``--settled`` CONFIRMED rows, then ``--pending`` RECEIVED rows (a queue that keeps up);
* ``stuck``: the same with the oldest row still pending (one message the hub keeps refusing), the
  worst case for the floor: a load from id 0 (the queue's restart from disk) walks every row.

For each: ``first_pending_id`` right after opening (``cold``: the floor read from meta; ``lost``: no
saved floor, as after a kill -9 before the first lease renewal) and again (``warm``), then
``load_pending(0, 1000)`` and ``load_pending(first - 1, 1000)``. Milliseconds of process CPU, best of
``--repeat``. Each store builds its own database the way the agent writes one (holding the lease,
releasing it at the end, which saves the floor and, since Q2, the pending map), so each is priced
with what it saves; ``upgrade_s`` is opening the first time (a migration when the schemas differ).

    git archive HEAD medagent | tar -x -C /tmp/base   # the store before the change
    python benchmarks/queue_pending_scan.py --compare /tmp/base/medagent/queue/store.py

Figures: benchmarks/perf-log.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

from store_module import load_store

from medagent.queue.records import DuplicatePolicy, InboundRecord

BODY = b"MSH|^~\\&|LAB|NORTH|HIS|MAIN|20261130120000||ADT^A01|0|P|2.5\r" + b"PID|1||12345^^^MRN||DOE^JOHN\r" * 4


def build(store_module: ModuleType, path: Path, settled: int, pending: int, stuck: bool) -> None:
    store = store_module.QueueStore(path)
    try:
        store.acquire_lease("bench", 3600)
        now = time.time()
        total, group = settled + pending, 2000
        for start in range(0, total, group):
            count = min(group, total - start)
            records = [InboundRecord("adt", "r", "LAB^NORTH", str(start + i), "ADT^A01", BODY, now) for i in range(count)]
            store.insert_batch(records, [DuplicatePolicy.OFF] * count)
        store.mark_confirmed(range(2 if stuck else 1, settled + 1))
        store.release_lease("bench")
        store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        store.close()


def _cpu_ms(call: Callable[[], object]) -> float:
    started = time.process_time()
    call()
    return (time.process_time() - started) * 1000


def measure(store_module: ModuleType, path: Path, repeat: int, lose_floor: bool) -> dict[str, float]:
    best: dict[str, float] = {}

    def keep(name: str, value: float) -> None:
        best[name] = round(min(best.get(name, float("inf")), value), 3)

    for _ in range(repeat):
        if lose_floor:
            with sqlite3.connect(path) as conn:
                conn.execute("DELETE FROM meta WHERE key IN ('pending_floor', 'pending_map')")
        store = store_module.QueueStore(path)
        try:
            keep("lost" if lose_floor else "cold", _cpu_ms(store.first_pending_id))
            keep("warm", _cpu_ms(store.first_pending_id))
            first = store.first_pending_id()
            keep("load_0", _cpu_ms(partial(store.load_pending, 0, 1000)))
            keep("load_first", _cpu_ms(partial(store.load_pending, first - 1, 1000)))
        finally:
            store.close()
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settled", type=int, default=1_000_000)
    parser.add_argument("--pending", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--compare", metavar="STORE_PY", help="the store.py before the change")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    base = load_store(args.compare)
    candidates = {"current": load_store(None), **({"base": base} if args.compare else {})}
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("tail", "stuck"):
            copies = {}
            for name, module in candidates.items():
                copies[name] = Path(tmp) / name / f"{case}.sqlite3"
                copies[name].parent.mkdir(exist_ok=True)
                build(module, copies[name], args.settled, args.pending, case == "stuck")
                started = time.process_time()
                module.QueueStore(copies[name]).close()  # the current store upgrades its copy here
                upgrade_s = time.process_time() - started
                result = {"store": name, "case": case, "settled": args.settled, "pending": args.pending,
                          "upgrade_s": round(upgrade_s, 2), **measure(module, copies[name], args.repeat, False)}
                if name == "current":
                    result.update(lost=measure(module, copies[name], 1, True)["lost"])
                print(json.dumps(result) if args.json else
                      " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
            for copy in copies.values():
                shutil.rmtree(copy.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
