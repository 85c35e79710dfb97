"""How long the agent's intake commits wait while the stats recount reads a capped queue.

Issue 19 (T2): at the size cap the soak's longest ACKs (338-441 ms) fell in windows where the
queue's files shrank. The mechanism, reproduced here with the real classes: the agent's stats
recount (``QueueStore.stats()`` on a connection of its own, as ``durable._read_stats`` runs it
after every retention pass) reads the whole table; while it reads, its snapshot pins the WAL, so
PASSIVE rounds cannot copy past it, RESTARTs wait for it with the writer held out, and once the
WAL passed `truncate_above_bytes` a TRUNCATE waited for it (up to 5 s) with the writer held out.

This script fills a queue database (tmp dir) with N CONFIRMED rows of the 625-byte ADT^A01,
starts a `WalCheckpointer` as the agent does, then for `--seconds` one thread commits groups of
`--group` records through ``QueueStore.insert_batch`` without pause (the intake) while another
runs ``stats()`` on its own connection every `--recount-every` seconds. It prints the commit
latency distribution (p50, p99, p99.9, max, commits over 100 ms), the recount durations and the
checkpointer's counters. Compare designs in one sitting with ``PYTHONPATH=<frozen copy> python
-P benchmarks/wal_pinned_commit.py``. Wall-clock figures on a shared box: alternate A/B runs.

Usage: python benchmarks/wal_pinned_commit.py [--rows 150000] [--seconds 20] [--group 10]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from medagent.bench.loadgen import SAMPLE_ADT_A01
from medagent.queue.records import DuplicatePolicy, InboundRecord
from medagent.queue.store import QueueStore
from medagent.storage.checkpoint import WalCheckpointer


def _records(start: int, n: int) -> list[InboundRecord]:
    now = time.time()
    return [InboundRecord(channel="adt", remote="127.0.0.1:1", sender="S", control_id=f"c{start + i}",
                          message_type="ADT^A01", body=SAMPLE_ADT_A01, received_at=now) for i in range(n)]


def _fill(store: QueueStore, rows: int) -> None:
    done = 0
    while done < rows:
        n = min(5000, rows - done)
        results = store.insert_batch(_records(done, n), [DuplicatePolicy.OFF] * n)
        store.mark_confirmed([r.row_id for r in results if r.row_id is not None])
        done += n


def _recounts(path: Path, every_s: float, stop: threading.Event, spent: list[float]) -> None:
    while not stop.wait(every_s):
        reader = QueueStore(path, create=False)
        try:
            t0 = time.perf_counter()
            reader.stats()
            spent.append(time.perf_counter() - t0)
        finally:
            reader.close()


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(rows: int, seconds: float, group: int, recount_every_s: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = QueueStore(Path(tmp) / "queue.db")
        try:
            _fill(store, rows)
            store.disable_autocheckpoint()
            checkpointer = WalCheckpointer(store.path)
            checkpointer.start()
            stop, recounts = threading.Event(), []
            counter = threading.Thread(target=_recounts, args=(store.path, recount_every_s, stop, recounts))
            counter.start()
            commits: list[float] = []
            try:
                deadline, next_id = time.monotonic() + seconds, rows
                while time.monotonic() < deadline:
                    batch = _records(next_id, group)
                    t0 = time.perf_counter()
                    results = store.insert_batch(batch, [DuplicatePolicy.OFF] * group)
                    commits.append(time.perf_counter() - t0)
                    if results[0].error is not None:
                        raise SystemExit(f"commit failed: {results[0].error}")
                    next_id += group
            finally:
                stop.set()
                counter.join()
                checkpointer.stop()
            wal_mb = Path(f"{store.path}-wal").stat().st_size / 2**20
        finally:
            store.close()
    ordered = sorted(commits)
    slow = sum(1 for c in commits if c > 0.1)
    print(f"rows {rows:,}  commits {len(commits):,} x {group}  commit ms p50 {_quantile(ordered, .5) * 1e3:.2f}"
          f" p99 {_quantile(ordered, .99) * 1e3:.1f} p99.9 {_quantile(ordered, .999) * 1e3:.1f}"
          f" max {ordered[-1] * 1e3:.1f}  >100ms {slow}  recounts {len(recounts)}"
          f" ({', '.join(f'{r * 1e3:.0f}' for r in recounts)} ms)  restarts {checkpointer.restarts}"
          f" truncations {checkpointer.truncations} deferrals {getattr(checkpointer, 'deferrals', '-')}"
          f"  wal file {wal_mb:.1f} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=150_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--group", type=int, default=10)
    parser.add_argument("--recount-every", type=float, default=3.0)
    args = parser.parse_args()
    measure(args.rows, args.seconds, args.group, args.recount_every)


if __name__ == "__main__":
    main()
