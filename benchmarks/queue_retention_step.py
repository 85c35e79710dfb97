"""How long one retention step holds the agent's event loop, as the table grows.

The agent (durability "normal") runs queue writes and retention steps inline on its event loop,
between intake commits: the longest step is the longest intake stall retention can cause. This
script fills a real queue database (tmp dir) with N CONFIRMED rows of the 625-byte ADT^A01,
sets the size cap below the live data, and times every step of one full retention pass, with
the WAL checkpointed by a `WalCheckpointer` thread as in the agent (no checkpoint inside a commit):

* ``sweep(max_rows=2000)``: the pre-issue-19 step (each step restarts the age walks at id 0
  and counts spool usage with a table scan);
* ``sweep_slice(chunk_rows=500, scan_rows=20000)``: the incremental pass (bounded id windows,
  spool usage once per pass; since the step budget, one age walk per pass and every step stops
  after ``QueueStore.step_budget_s`` of work).

Run it against a frozen copy of an older tree with ``PYTHONPATH=<copy> python -P
benchmarks/queue_retention_step.py`` to compare designs in one sitting.

Usage: python benchmarks/queue_retention_step.py [--rows 300000] [--cap-fraction 0.8]
Prints rows, steps, total seconds, the median, 99th percentile and longest step for each variant (plus the end-of-pass
stats() scan the maintenance task does once per pass).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from medagent.bench.loadgen import SAMPLE_ADT_A01
from medagent.queue.records import DuplicatePolicy, InboundRecord
from medagent.queue.store import QueueStore
from medagent.storage.checkpoint import WalCheckpointer

CHUNK, SCAN, MAX_STEPS = 2000, 20_000, 1_000_000
NEW_CHUNK = 500  # the incremental pass deletes 500 rows per step (durable._SWEEP_CHUNK_ROWS)


def fill(store: QueueStore, rows: int) -> None:
    body = SAMPLE_ADT_A01
    now = time.time()
    done = 0
    while done < rows:
        n = min(5000, rows - done)
        batch = [InboundRecord(channel="adt", remote="127.0.0.1:1", sender="S", control_id=f"c{done + i}",
                               message_type="ADT^A01", body=body, received_at=now) for i in range(n)]
        results = store.insert_batch(batch, [DuplicatePolicy.OFF] * n)
        store.mark_confirmed([r.row_id for r in results if r.row_id is not None])
        done += n


def timed_pass(step) -> tuple[int, list[float]]:
    """Rows deleted and the duration of every step of one pass."""
    deleted, spent = 0, []
    for _ in range(MAX_STEPS):
        t0 = time.perf_counter()
        count, finished = step()
        spent.append(time.perf_counter() - t0)
        deleted += count
        if finished:
            break
    return deleted, spent


def measure(rows: int, cap_fraction: float, variant: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = QueueStore(Path(tmp) / "queue.db")
        try:
            fill(store, rows)
            cap_mb = store.used_bytes() * cap_fraction / (1024 * 1024)
            if variant == "sweep":
                def step():
                    count = store.sweep(7, cap_mb, 90, chunk_rows=CHUNK, max_rows=CHUNK)
                    return count, count < CHUNK
            else:
                def step():
                    return store.sweep_slice(7, cap_mb, 90, chunk_rows=NEW_CHUNK, scan_rows=SCAN)
            store.disable_autocheckpoint()
            checkpointer = WalCheckpointer(store.path)
            checkpointer.start()
            try:
                deleted, spent = timed_pass(step)
            finally:
                checkpointer.stop()
            t0 = time.perf_counter()
            store.stats()
            stats_s = time.perf_counter() - t0
        finally:
            store.close()
    ordered = sorted(spent)
    p50, p99 = (ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.5, 0.99))
    print(f"{variant:12s} rows {rows:>9,}  deleted {deleted:>8,}  steps {len(spent):>5}  pass {sum(spent) * 1e3:>9.1f} ms  "
          f"step p50 {p50 * 1e3:>6.1f} p99 {p99 * 1e3:>6.1f} max {ordered[-1] * 1e3:>7.1f} ms  "
          f"stats() {stats_s * 1e3:>7.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--cap-fraction", type=float, default=0.8)
    parser.add_argument("--variants", default="sweep,sweep_slice")
    args = parser.parse_args()
    for variant in args.variants.split(","):
        measure(args.rows, args.cap_fraction, variant)


if __name__ == "__main__":
    main()
