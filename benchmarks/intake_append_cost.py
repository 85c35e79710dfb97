"""Price of one lone durable commit against one append to a log file (docs/intake-journal.md).

At one lock-step sender every record is its own commit: ``QueueStore.insert_batch`` of one
record is an autocommit INSERT plus the duplicate lookup, i.e. SQLite's read and write locks
(``fcntl``), its WAL frames (``pwrite``) and the wal-index update. The journal design in
docs/intake-journal.md replaces that, on the path that gates the device's ACK, with one
``write()`` of a length- and CRC-framed record to an ``O_APPEND`` file, and moves rows into
SQLite in groups afterwards. This script measures the two costs side by side so the design's
expected gain rests on a figure, not an estimate:

* ``sqlite``: ``insert_batch([record], [FLAG])`` on a fresh queue (``durability="normal"``, the
  agent's default), the duplicate lookup included;
* ``sqlite-nodedup``: the same with the ``OFF`` policy (the INSERT and its commit alone);
* ``append``: the record's fields framed as the journal would frame them and written with one
  ``os.write`` (no fsync: the same kill -9 guarantee as ``synchronous=NORMAL``);
* ``journal``: the built path, ``insert_batch([record], [FLAG])`` on a store with its intake
  journal open (dedup lookup in SQLite and in the journal's map, framing, one ``os.write``), plus
  the mover's share: ``move_journal`` after every 256 records, as the agent's count trigger does.

Blocks of ``--count`` records alternate between the three (``--repeat`` rounds); reported is the
thread CPU per record, best and median over rounds (the machine is shared: the best round is the
least disturbed one). Use::

    python benchmarks/intake_append_cost.py [--count 4000] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from medagent.queue.records import DuplicatePolicy, InboundRecord
from medagent.queue.store import QueueStore

CORPUS_MESSAGE = Path(__file__).resolve().parent.parent / "tests" / "data" / "adt_a01.hl7"
_FRAME_HEADER = struct.Struct("<II")  # payload length, CRC-32 of the payload


def _records(body: bytes, count: int, tag: str) -> list[InboundRecord]:
    now = time.time()
    return [
        InboundRecord("bench", "127.0.0.1:5000", "SENDER", f"{tag}-{i}", "ADT^A01", body, now)
        for i in range(count)
    ]


def _journal_frame(row_id: int, record: InboundRecord) -> bytes:
    """The record as a journal would hold it: the row id and every column the INSERT writes."""
    text = "\x1f".join((record.channel, record.remote, record.sender, record.control_id,
                        record.message_type, record.content_type)).encode()
    payload = struct.pack("<qdI", row_id, record.received_at, len(text)) + text + record.body
    return _FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _timed(work: Callable[[], None], count: int) -> float:
    started = time.thread_time()
    work()
    return (time.thread_time() - started) / count * 1e6


def run(count: int, repeat: int) -> dict[str, dict[str, float]]:
    body = CORPUS_MESSAGE.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    samples: dict[str, list[float]] = {"sqlite": [], "sqlite-nodedup": [], "append": [], "journal": []}
    with tempfile.TemporaryDirectory(prefix="medagent-append-") as tmp:
        store = QueueStore(os.path.join(tmp, "queue.db"))
        journaled = QueueStore(os.path.join(tmp, "journaled.db"))
        journaled.open_journal()
        journal = os.open(os.path.join(tmp, "intake.journal"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for round_no in range(repeat):
                flagged = _records(body, count, f"f{round_no}")
                plain = _records(body, count, f"p{round_no}")
                appended = _records(body, count, f"a{round_no}")
                via_journal = _records(body, count, f"j{round_no}")

                def insert_flagged() -> None:
                    for record in flagged:
                        store.insert_batch([record], [DuplicatePolicy.FLAG])

                def insert_plain() -> None:
                    for record in plain:
                        store.insert_batch([record], [DuplicatePolicy.OFF])

                def append() -> None:
                    for row_id, record in enumerate(appended):
                        os.write(journal, _journal_frame(row_id, record))

                def insert_journaled() -> None:
                    for number, record in enumerate(via_journal, start=1):
                        journaled.insert_batch([record], [DuplicatePolicy.FLAG])
                        if number % 256 == 0:
                            journaled.move_journal()
                    journaled.move_journal()

                samples["sqlite"].append(_timed(insert_flagged, count))
                samples["sqlite-nodedup"].append(_timed(insert_plain, count))
                samples["append"].append(_timed(append, count))
                samples["journal"].append(_timed(insert_journaled, count))
        finally:
            os.close(journal)
            store.close()
            journaled.close()
    return {name: {"best_us": min(values), "median_us": statistics.median(values)} for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000, help="records per block (default 4000)")
    parser.add_argument("--repeat", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    if args.count < 1 or args.repeat < 1:
        parser.error("--count and --repeat must be at least 1")
    result = run(args.count, args.repeat)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'path':<16} {'best µs/record':>15} {'median µs/record':>17}")
    for name, figures in result.items():
        print(f"{name:<16} {figures['best_us']:>15.1f} {figures['median_us']:>17.1f}")


if __name__ == "__main__":
    main()
