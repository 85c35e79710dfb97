"""``medagent hub migrate-store FROM TO``: copy every row of one hub store into another.

Typical use: move an embedded SQLite hub (``sqlite:///…/hub.sqlite3``) to PostgreSQL before
running several hub processes. Tables are copied in dependency order (agents, bots, channels,
messages, resources), each in keyset-ordered batches; each batch is one transaction in the
target that inserts the rows whose key is not there yet (``ON CONFLICT DO NOTHING``), keeping
message ids. So the copy is idempotent and resumable: run it again after an interruption (or
after the source took more messages) and it adds only what is missing. At the end the row
counts of both stores are compared table by table; a difference (the target held rows of
another hub, or the source changed meanwhile) fails the command with the counts.

Stop the hub first for a final copy: rows changed in the source after their batch was copied
(a reply recorded later, a retention purge) are not copied again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from medagent.hub.store.base import HubStore
from medagent.hub.store.common import TABLES

__all__ = ["CopyReport", "copy_store"]

#: at most one progress line per table and this many seconds (plus one at each table's end)
PROGRESS_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class CopyReport:
    #: table -> (rows in the source, rows in the target, rows this run inserted)
    tables: dict[str, tuple[int, int, int]]

    @property
    def mismatches(self) -> list[str]:
        return [f"{t}: {src} in the source, {dst} in the target"
                for t, (src, dst, _) in self.tables.items() if src != dst]


async def copy_store(source: HubStore, target: HubStore, progress: Callable[[str], None],
                     batch: int = 1000) -> CopyReport:
    """Copy every table of ``source`` into ``target`` and count both afterwards."""
    inserted_by_table: dict[str, int] = {}
    for table in TABLES:
        total = await source.count_rows(table)
        read = inserted = 0
        last = time.monotonic()
        async for rows in source.export_rows(table, batch):
            inserted += await target.import_rows(table, rows)
            read += len(rows)
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                progress(f"{table}: {read}/{total} rows read, {inserted} new in the target")
                last = time.monotonic()
        progress(f"{table}: done, {read} rows read, {inserted} new in the target")
        inserted_by_table[table] = inserted
    return CopyReport({t: (await source.count_rows(t), await target.count_rows(t), inserted_by_table[t])
                       for t in TABLES})
