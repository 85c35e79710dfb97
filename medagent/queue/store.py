"""Synchronous SQLite core of the durable inbound queue (no asyncio here).

Theory of operation
-------------------
One `QueueStore` owns one sqlite3 connection. It is used from one thread at a time (the
DurableQueue's writer thread, or an admin command); it does not lock anything itself.

* Journal: WAL, so admin readers never block the writer and the writer never blocks readers.
  `durability="normal"` runs `synchronous=NORMAL`: a COMMIT is in the WAL file (the OS page cache)
  when it returns, which survives kill -9 of the process but not a power loss.
  `durability="fsync"` runs `synchronous=FULL`: each COMMIT is fsynced, which survives power loss.
* Every write is one explicit `BEGIN IMMEDIATE ... COMMIT`. `insert_batch` inserts a whole group of
  messages in one transaction (group commit: one WAL append, one fsync in "fsync" mode). A lone
  record without confirmations (one lock-step sender) is one autocommit INSERT, its dedup lookup an
  autocommit read before it: we hold the single-writer lease and the one writer connection, so no
  insert can come between the two, and BEGIN/COMMIT were half the statements each message paid.
  (Folding the lookup into the INSERT, `INSERT ... SELECT/VALUES (subquery) ... RETURNING`, was
  measured and not kept: RETURNING and the self-referencing INSERT cost SQLite ephemeral tables,
  2-6 us more than the two statements.)
* Intake journal (docs/intake-journal.md; `open_journal`, which the lease holder calls under its
  lease; `durability="normal"` only): a lone record is committed by ONE framed `write()` to
  `<database>.intake.journal` (journal.py) instead of its autocommit INSERT: the same promise as
  `synchronous=NORMAL` (survives kill -9, not a power loss) for a few us instead of ~50-80. Its id
  comes from the same counter as a group's, and its dedup entry goes into an in-memory map that
  the lookup consults after SQLite's rows. Journal records are moved into SQLite (INSERT OR IGNORE
  with their ids) at the start of EVERY write transaction (`_write`, a group's `insert_batch`),
  and every read of rows (`load_pending`, `first_pending_id`, `stats`, retention, the spool scans)
  moves them first, so no reader or updater misses one and a confirmation of a journal row applies
  after its INSERT; the file is emptied only after that COMMIT. So every row in the journal has a
  larger id than every row in SQLite, and none is FAILED. `open_journal` replays every valid frame
  (a torn tail ends it) with INSERT OR IGNORE, skipping ids at or below the id high-water (they may
  have been moved and deleted since), then empties the file. A failed or short write refuses the
  record (`CommitResult.error`) and cuts the file back to its last good frame.
* Schema: versioned by `PRAGMA user_version`; `MIGRATIONS[i]` takes version i to i+1, each in one
  transaction, forward only, never dropping data. A database written by newer code raises
  `SchemaTooNew` rather than being touched.
* Row ids are never reused, even after retention deleted the newest rows, so `queue_uuid` + row
  id names one message for ever (the dispatcher builds websocket callback ids from them, and the
  hub may de-duplicate on them). Schema 3 dropped AUTOINCREMENT (its sqlite_sequence row was one
  of four pages each commit wrote): the store hands out ids from a counter seeded at open from
  max(max(id), meta `id_high_water`), and every delete transaction raises `id_high_water` to the
  largest id it deleted (retention is batched, so that costs nothing per message).
* Pending rows are found without an index (schema 3 dropped the partial `messages_pending` index,
  another page per commit): scans walk rowid ranges of a `PendingMap` (pending_map.py), a few runs
  of ids plus an open tail, a superset of the pending ids kept by this store's own state changes
  (confirmations move the tail, leaving a run behind for an old row the hub has not confirmed;
  walks tighten it), so one row left pending for days does not make every load from below it
  walk the millions of settled rows after it. The map and its floor (its lowest id) are saved in
  meta (`pending_map`, `pending_floor`) by the delete transactions and the lease's renewals and
  release. The one way a settled row becomes pending again, `retry_failed` (maybe from another
  process), lowers the saved floor, saves the ids it changed (`requeued_runs`) and bumps
  `requeue_generation` in its transaction; a store that sees a new generation adds those ids to
  its map (or, if it missed more than one retry, lowers its floor to the saved one), and a saved
  map counts only for its own generation (or the next, with that retry's ids). So the map may
  hold too much, never too little.
* De-duplication (issue 13, defect 3): a duplicate has the same (channel, sender, control_id)
  AND the same content as a non-FAILED row received within `dedup_window_s` before it. Content
  is the body's bytes for inline payloads and the channel's SHA-256 for file payloads. Why no
  stored digest of the body: the key lookup already finds the few rows that share a key (only
  resends and reused ids do), so comparing their bodies byte for byte costs nothing on the hot
  path, while hashing every body cost 3-10 us per row under load (BLAKE2b, measured with
  benchmarks/queue_insert.py), and equality has no collisions. A reused control id with other
  content (devices reset their counters) is a new message, inserted as usual and reported with
  `CommitResult.control_id_reused`. Messages without a control id are never duplicates.
* Payloads: a row holds inline bytes (`body`) or a file reference (`file_path` relative to the
  data directory, always below `spool/`, with `file_size` and `file_sha256`) plus a small
  metadata body. The store never reads payload files; it deletes a row's file after the
  transaction deleting the row committed (a crash in between leaves an orphan, which
  `sweep_orphan_files` removes: only files no row references).
* Lease: one row naming the process that may write (holder, host, pid, expiry). A live lease of
  another holder makes `acquire_lease` raise `QueueLocked`; a lease whose holder process is dead
  on this host, or whose expiry passed, is taken over.
* Retention (`sweep`) deletes CONFIRMED rows older than `retention_days` after they were settled,
  then the oldest CONFIRMED rows while the live data (database pages plus spool files)
  exceeds `retention_max_mb`, and FAILED rows
  older than `failed_retention_days`. It never deletes RECEIVED or SENT rows. Deletion goes in
  chunks of short transactions so the writer is never held for long. The incremental pass
  (`sweep_slice`) applies the same rules in steps of at most `_STEP_BUDGET_S` of work: one walk
  over the ids for both age rules (the table is read once per pass, not twice), then the size
  trim in chunks sized from the measured cost of the previous ones.

Error contract: `insert_batch` never raises for storage errors (disk full, read-only, locked,
I/O): it rolls back and returns a `CommitResult` with `error` for every record. The other write
methods raise `StorageError`; opening raises `QueueError` subclasses with actionable messages.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

from medagent.queue.journal import IntakeJournal, JournalRow, decode_frames, encode_frame
from medagent.queue.keyfilter import KeyFilter
from medagent.queue.pending_map import PendingMap, decode_runs, encode_runs, id_runs
from medagent.queue.records import (
    CommitResult,
    DuplicatePolicy,
    FilePayload,
    InboundRecord,
    QueuedMessage,
    RowState,
)
from medagent.storage.checkpoint import WAL_SIZE_LIMIT_BYTES
from medagent.storage.errors import storage_error_reason
from medagent.storage.files import ensure_private_dir, prepare_private_database

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SPOOL_DIRNAME",
    "Durability",
    "QueueError",
    "QueueLocked",
    "QueueStore",
    "SchemaTooNew",
    "StorageError",
    "content_key",
    "id_runs",
    "spool_path_problem",
    "storage_error_reason",
]

log = logging.getLogger(__name__)

#: Directory below the data directory that holds file payloads (one subdirectory per channel).
SPOOL_DIRNAME = "spool"

Durability = Literal["normal", "fsync"]
_SYNCHRONOUS: dict[str, str] = {"normal": "NORMAL", "fsync": "FULL"}
_MIB = 1024 * 1024
_DAY_S = 86400.0
_T = TypeVar("_T")

#: How long one step of an incremental retention pass (`sweep_slice`) may work before it returns
#: (it may overrun by one sub-window or one delete chunk). The agent runs steps inline on its
#: event loop between intake commits, so this bounds the intake stall a step causes (issue 19:
#: a 20,000-id age window took 40-85 ms of loop time under load, 12-19 ms of it CPU, twice per
#: pass over the whole table).
_STEP_BUDGET_S = 0.010
#: Ids one read of the age walk covers: the rows hold their bodies inline, so 2,000 ids read
#: ~1.4 MB of pages (~3-6 ms), and the budget is checked between reads.
_AGE_SUBWINDOW_IDS = 2000
#: First guess of one trimmed row's cost before a pass measured it, and the floor of a chunk.
_TRIM_ROW_COST_S = 50e-6
_TRIM_MIN_ROWS = 16
#: Ids one read of the stats recount covers. Each read is its own short read transaction: a
#: reader holds the WAL frames of its snapshot, and while it reads no checkpoint can copy past
#: them nor start the WAL over (issue 19, T2: the recount as one whole-table scan read for
#: 0.3-1 s at a 128 MB cap, PASSIVE rounds copied a fraction of the WAL meanwhile, and the
#: TRUNCATE that followed held intake out until the scan ended). 2,000 ids: ~1.4 MB of pages,
#: a few ms per read (like `_AGE_SUBWINDOW_IDS`).
_STATS_RANGE_IDS = 2000


class QueueError(Exception):
    """Base class of every queue error."""


class QueueLocked(QueueError):
    """Another live process holds the queue's single-writer lease."""


class SchemaTooNew(QueueError):
    """The database was written by a newer medagent; this version will not touch it."""


class StorageError(QueueError):
    """SQLite failed a write (disk full, read-only file, I/O error, lock timeout).

    ``reason`` is the short PHI-free part ("storage error: database or disk is full") without
    the database path, for answers to devices and state-change log lines."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


# The message columns of schema 1 after the id (schema 3 rebuilds the table with the same ones
# plus schema 2's file columns). Migrations only ever add columns, so this text never changes.
_SCHEMA1_COLUMNS = """
            channel TEXT NOT NULL,
            remote TEXT NOT NULL,
            sender TEXT NOT NULL,
            control_id TEXT NOT NULL,
            message_type TEXT NOT NULL,
            content_type TEXT NOT NULL,
            body BLOB NOT NULL,
            received_at REAL NOT NULL,
            state INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            duplicate_of INTEGER,
            last_error TEXT,
            updated_at REAL NOT NULL
"""

# Forward-only migrations: MIGRATIONS[i] takes user_version i to i + 1 in one transaction.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, {_SCHEMA1_COLUMNS})",
        "CREATE INDEX messages_dedup ON messages (channel, sender, control_id)",
        # Partial index: only pending rows (RECEIVED, SENT) are in it, so it stays small and
        # walks pending rows in id (FIFO) order however many settled rows are kept.
        "CREATE INDEX messages_pending ON messages (id) WHERE state < 2",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        """CREATE TABLE lease (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            holder TEXT NOT NULL,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            acquired_at REAL NOT NULL,
            expires_at REAL NOT NULL
        )""",
    ),
    (
        # 1 -> 2: file payloads (issue 13). Old rows keep NULL file columns (inline payloads).
        "ALTER TABLE messages ADD COLUMN file_path TEXT",
        "ALTER TABLE messages ADD COLUMN file_size INTEGER",
        "ALTER TABLE messages ADD COLUMN file_sha256 TEXT",
        # No index on file_path: even a partial one cost 15-25 % of the insert time
        # (benchmarks/queue_insert.py, group 100: 21.2 vs 16.7 us/row). Retention reads the file
        # column of the rows it deletes anyway; stats count files in their one table scan.
    ),
    (
        # 2 -> 3 (issue 19): the table rebuilt without AUTOINCREMENT and without the partial
        # pending index, two of the four pages each single-row commit wrote (see the module
        # docstring for what keeps ids unique and pending scans cheap). The old sequence becomes
        # the id high-water; the pending floor starts at the oldest pending row.
        f"CREATE TABLE messages_v3 (id INTEGER PRIMARY KEY, {_SCHEMA1_COLUMNS},"
        " file_path TEXT, file_size INTEGER, file_sha256 TEXT)",
        (
            "INSERT INTO messages_v3 SELECT id, channel, remote, sender, control_id, message_type, content_type,"
            " body, received_at, state, attempts, duplicate_of, last_error, updated_at, file_path, file_size,"
            " file_sha256 FROM messages ORDER BY id"
        ),
        "INSERT OR REPLACE INTO meta (key, value) SELECT 'id_high_water', seq FROM sqlite_sequence WHERE name = 'messages'",
        "DROP TABLE messages",  # its indexes and its sqlite_sequence row go with it
        "ALTER TABLE messages_v3 RENAME TO messages",
        "CREATE INDEX messages_dedup ON messages (channel, sender, control_id)",
        (
            "INSERT OR REPLACE INTO meta (key, value) SELECT 'pending_floor', coalesce("
            f"(SELECT min(id) FROM messages WHERE state < {int(RowState.CONFIRMED)}),"
            " (SELECT coalesce(max(id), 0) + 1 FROM messages))"
        ),
    ),
)
# Target versions whose migration rebuilds the messages table: logged with the row count when
# the queue is large, since it runs at start-up and takes seconds per million rows.
_REBUILDS = frozenset({3})
_REBUILD_LOG_ROWS = 100_000
SCHEMA_VERSION = len(MIGRATIONS)

_PENDING_FILTER = f"state < {int(RowState.CONFIRMED)}"
_INSERT_SQL = (
    "INSERT INTO messages (id, channel, remote, sender, control_id, message_type, content_type, body,"
    " received_at, state, attempts, duplicate_of, updated_at, file_path, file_size, file_sha256)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?, ?, ?, ?)"
)
# The mover and the replay of the intake journal: a row already there (a replay after the move
# committed but before the journal was emptied) is left as it is.
_INSERT_OR_IGNORE_SQL = _INSERT_SQL.replace("INSERT INTO", "INSERT OR IGNORE INTO", 1)
#: The intake journal's file name: the database's name plus this (one journal per queue database).
JOURNAL_SUFFIX = ".intake.journal"
# Earlier non-FAILED rows with the same (channel, sender, control_id) as any record of a chunk;
# their content: the file's SHA-256 for a file payload, else the body.
_DEDUP_SQL = (
    "SELECT m.id, m.channel, m.sender, m.control_id, m.received_at,"
    " coalesce(lower(m.file_sha256), m.body) FROM (VALUES {values}) AS k"
    " JOIN messages AS m ON m.channel = k.column1 AND m.sender = k.column2 AND m.control_id = k.column3"
    f" WHERE m.state != {int(RowState.FAILED)} AND m.received_at >= ? ORDER BY m.id"
)


# The same lookup for one key (a group of one record: one lock-step sender), without the VALUES
# table and its temporary ORDER BY b-tree: 10-30 % less time per group (micro-benchmark).
_DEDUP_ONE_SQL = (
    "SELECT id, channel, sender, control_id, received_at, coalesce(lower(file_sha256), body) FROM messages"
    f" WHERE channel = ? AND sender = ? AND control_id = ? AND state != {int(RowState.FAILED)}"
    " AND received_at >= ? ORDER BY id"
)


@functools.lru_cache(maxsize=64)
def _dedup_sql(keys: int) -> str:
    """The dedup lookup for `keys` keys (the text is built once per size, not once per group)."""
    if keys == 1:
        return _DEDUP_ONE_SQL
    return _DEDUP_SQL.format(values=",".join(["(?, ?, ?)"] * keys))


_NO_FILE = (None, None, None)  # file_path, file_size, file_sha256 of an inline payload
# The key filter's horizon at open (_stored_horizon): rows read, and the margin added.
_NEWEST_RECEIVED_SQL = "SELECT max(received_at) FROM messages WHERE id > ?"
_HORIZON_ROWS = 1000
_HORIZON_MARGIN_S = 60.0
_LOOKUP_CHUNK = 300  # 3 parameters per record: stays under SQLite's historic 999-parameter limit
_QUEUED_COLUMNS = (
    "id, channel, remote, control_id, message_type, body, content_type, received_at, attempts, duplicate_of,"
    " file_path, file_size, file_sha256"
)
_INFO_COLUMNS = (
    "id, channel, remote, sender, control_id, message_type, content_type, length(body), received_at,"
    " state, attempts, duplicate_of, last_error, updated_at, file_path, file_size"
)
_INFO_KEYS = (
    "id", "channel", "remote", "sender", "control_id", "message_type", "content_type", "size",
    "received_at", "state", "attempts", "duplicate_of", "last_error", "updated_at", "file", "file_size",
)
REQUEUE_GENERATION_KEY = "requeue_generation"
ID_HIGH_WATER_KEY = "id_high_water"  # the largest id any delete removed (ids are never reused)
PENDING_FLOOR_KEY = "pending_floor"  # no row below this id is pending (see the module docstring)
PENDING_MAP_KEY = "pending_map"  # "<generation>/<PendingMap.encode()>": valid while the generation is current
REQUEUED_KEY = "requeued_runs"  # "<generation>/<id runs>": the rows the retry that made that generation changed
_MARKS_SQL = (
    f"SELECT key, value FROM meta WHERE key IN ('{REQUEUE_GENERATION_KEY}', '{PENDING_FLOOR_KEY}',"
    f" '{PENDING_MAP_KEY}', '{REQUEUED_KEY}')"
)
_DELETE_META_SQL = "DELETE FROM meta WHERE key = ?"
_SET_META_SQL = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
_RAISE_HIGH_WATER_SQL = (
    f"INSERT INTO meta (key, value) VALUES ('{ID_HIGH_WATER_KEY}', ?1) ON CONFLICT (key)"
    " DO UPDATE SET value = max(CAST(value AS INTEGER), ?1)"
)
_LOWER_FLOOR_SQL = (
    f"INSERT INTO meta (key, value) VALUES ('{PENDING_FLOOR_KEY}', ?1) ON CONFLICT (key)"
    " DO UPDATE SET value = min(CAST(value AS INTEGER), ?1)"
)


def content_key(record: InboundRecord) -> bytes | str:
    """The content part of the dedup key: the file's SHA-256 (a str) for a file payload, else
    the body (bytes); a str never equals bytes, so a file never matches an inline body."""
    return record.body if record.file is None else record.file.sha256.lower()


def spool_path_problem(path: str) -> str | None:
    """Why `path` is not an acceptable file payload reference, or None.

    It must be relative, POSIX-style, normalized and below ``spool/``: the store deletes these
    files on retention, so a reference must never reach outside the spool directory.
    """
    if not path or "\\" in path or "\x00" in path:
        return "empty path or one with a backslash or NUL"
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(part in ("..", ".") for part in path.split("/")) or str(pure) != path:
        return "not a normalized relative path"
    if len(pure.parts) < 2 or pure.parts[0] != SPOOL_DIRNAME:
        return f"not below {SPOOL_DIRNAME}/"
    return None


def _queued(row: Sequence[Any]) -> QueuedMessage:
    file_path, file_size, file_sha256 = row[10:13]
    file = None if file_path is None else FilePayload(file_path, int(file_size), str(file_sha256))
    return QueuedMessage(*row[:10], file)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """sqlite errors of a read become StorageError."""
    try:
        yield
    except sqlite3.Error as exc:
        reason = storage_error_reason(exc)
        raise StorageError(f"queue database {path}: {reason}", reason) from exc


def _pid_is_dead(pid: int) -> bool:
    """True only when we are sure no process `pid` exists on this host (POSIX only)."""
    if os.name != "posix" or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


# Cumulative confirmation: one statement per run of consecutive ids (the hub confirms whole
# batches, so a group of confirmations is usually one run) instead of one per row.
_MAX_ROWID = 2**63 - 1
_CONFIRM_SQL = (
    f"UPDATE messages SET state = {int(RowState.CONFIRMED)}, updated_at = ?"
    f" WHERE id BETWEEN ? AND ? AND state != {int(RowState.CONFIRMED)}"
)


_WALK_FROM_SQL = f"SELECT {{columns}} FROM messages WHERE id >= ? AND {_PENDING_FILTER} ORDER BY id LIMIT ?"
_WALK_RANGE_SQL = (
    f"SELECT {{columns}} FROM messages WHERE id BETWEEN ? AND ? AND {_PENDING_FILTER} ORDER BY id LIMIT ?"
)
_FIRST_PENDING_SQL = (
    f"SELECT (SELECT id FROM messages WHERE id >= ?1 AND {_PENDING_FILTER} ORDER BY id LIMIT 1),"
    " (SELECT max(id) FROM messages)"
)


def _requeued_runs(saved: str | None, generation: int, known: int) -> list[tuple[int, int]] | None:
    """The rows the retry that made `generation` changed, if that retry is the only one after
    the `known` generation and it saved them (meta `requeued_runs`); else None (then only the
    saved floor is known)."""
    if saved is None or generation != known + 1:
        return None
    saved_generation, _, runs = saved.partition("/")
    if saved_generation != str(generation):
        return None
    try:
        return decode_runs(runs)
    except ValueError:
        return None


def _no_work(conn: sqlite3.Connection) -> None:
    """A write transaction with nothing but the move of the journal's records (`_write`)."""


def _confirm_params(ids: Iterable[int], now: float) -> list[tuple[float, int, int]]:
    return [(now, first, last) for first, last in id_runs(ids)]


class QueueStore:
    """The queue database: schema, group inserts, state changes, lease, stats and retention."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "normal",
        dedup_window_s: float = 3600.0,
        max_db_mb: float | None = None,
        busy_timeout_s: float = 5.0,
        create: bool = True,
        data_dir: str | os.PathLike[str] | None = None,
        adopt_journal: bool = True,
        key_filter_mb: float = 32.0,
    ) -> None:
        """`data_dir` (default: the database's directory) is where file payload paths start.
        With `adopt_journal`, an intake journal left by a process that holds no live lease (a
        kill -9) is read into SQLite at open (`_adopt_orphaned_journal`), so an admin command
        sees its records; the queue itself replays it under its lease (`open_journal`).
        With `key_filter_mb` > 0, the duplicate check skips its SQLite lookup for keys an in-memory
        filter of at most that many MB has certainly not seen (medagent/queue/keyfilter.py)."""
        if durability not in _SYNCHRONOUS:
            raise ValueError(f"durability must be 'normal' or 'fsync', not {durability!r}")
        self.path = Path(path)
        self.data_dir = Path(data_dir) if data_dir is not None else self.path.parent
        self.durability: Durability = durability
        self.dedup_window_s = float(dedup_window_s)
        if not create and not self.path.exists():
            raise QueueError(f"no queue database at {self.path} (has the agent run with this data_dir?)")
        if create:  # issue 18, defect 2: 0700 directory, 0600 database (SQLite copies it to -wal/-shm)
            try:
                ensure_private_dir(self.path.parent)
                prepare_private_database(self.path)
            except OSError as exc:
                raise QueueError(f"cannot open queue database {self.path}: {storage_error_reason(exc)}") from exc
        # The intake journal (open_journal; None: every record goes to SQLite): its records not
        # yet in SQLite, as INSERT rows in id order, and their dedup entries by key.
        self._journal: IntakeJournal | None = None
        self._residents: list[JournalRow] = []
        self._resident_keys: dict[tuple[str, str, str], list[tuple[int, float, bytes | str]]] = {}
        try:
            self._conn = sqlite3.connect(
                str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise QueueError(f"cannot open queue database {self.path}: {exc}") from exc
        try:
            self._configure(durability, max_db_mb)
            self._migrate()
            self.queue_uuid = self._ensure_queue_uuid()
            self._last_id, self._pending, self._generation = self._read_marks()
            self._key_filter = KeyFilter(
                self.dedup_window_s, covered_after=self._stored_horizon(), max_bytes=int(key_filter_mb * 1024 * 1024)
            ) if key_filter_mb > 0 else None
            if adopt_journal:
                self._adopt_orphaned_journal()
        except sqlite3.Error as exc:
            self._conn.close()
            raise QueueError(f"cannot open queue database {self.path}: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise
        self._cursor = self._conn.cursor()
        # Where the current incremental retention pass is (`sweep_slice`): phase, id cursor of
        # an age phase, spool bytes counted once per size phase.
        self._pass_phase = 0
        self._pass_cursor = 0
        self._pass_spool_bytes: int | None = None
        self.step_budget_s = _STEP_BUDGET_S
        self._trim_row_cost_s = _TRIM_ROW_COST_S  # seconds per trimmed row, from the last chunk

    # ----------------------------------------------------------------- opening and schema

    def _configure(self, durability: Durability, max_db_mb: float | None) -> None:
        conn = self._conn
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise QueueError(
                f"queue database {self.path} cannot use WAL journaling (got {mode!r}); "
                "put data_dir on a local filesystem"
            )
        conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[durability]}")
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
        # Statement journals and sorts in memory (all bounded here: chunked retention, ranged
        # recounts): a temp file is unlinked at once, and its blocks are freed when it closes,
        # which on a disk mounted with `discard` waits for the device (traced in capped soaks:
        # 84 ms of intake stalls in 8 s, in ext4_evict_inode -> blkdev_issue_discard).
        conn.execute("PRAGMA temp_store = MEMORY")
        if max_db_mb is not None:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            max_pages = max(1, math.ceil(max_db_mb * _MIB / page_size))
            conn.execute(f"PRAGMA max_page_count = {int(max_pages)}")

    def disable_autocheckpoint(self) -> None:
        """Leave WAL checkpoints to a WalCheckpointer thread (see checkpoint.py)."""
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")

    def _migrate(self) -> None:
        conn = self._conn
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        self._check_not_too_new(version)
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        rows = 0
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # re-read under the lock
            self._check_not_too_new(version)
            if version and _REBUILDS.intersection(range(version + 1, SCHEMA_VERSION + 1)):
                rows = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
                if rows >= _REBUILD_LOG_ROWS:
                    log.warning("queue %s: upgrading schema %d -> %d rebuilds %d rows; this takes a few seconds"
                                " per million rows and needs free disk space about the database's size",
                                self.path, version, SCHEMA_VERSION, rows)
            for target, statements in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in statements:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback_quietly()
            raise QueueError(
                f"cannot upgrade queue database {self.path} from schema {version} to {SCHEMA_VERSION}"
                f" ({storage_error_reason(exc)}); it was left unchanged: free disk space (an upgrade may"
                " copy the table) and start again, or run the medagent that wrote it"
            ) from exc
        except BaseException:
            self._rollback_quietly()
            raise
        if rows >= _REBUILD_LOG_ROWS:
            log.warning("queue %s: schema upgraded to %d in %.1f s", self.path, SCHEMA_VERSION,
                        time.monotonic() - started)

    def _read_marks(self) -> tuple[int, PendingMap, int]:
        """(the largest id ever handed out, where pending rows may be, the requeue generation) at
        open: the saved pending map if it is of the current generation, else the saved floor."""
        conn = self._conn
        marks = dict(conn.execute(_MARKS_SQL))
        high_water = conn.execute(f"SELECT value FROM meta WHERE key = '{ID_HIGH_WATER_KEY}'").fetchone()
        largest = conn.execute("SELECT max(id) FROM messages").fetchone()[0] or 0  # rowid b-tree: O(log n)
        generation = int(marks.get(REQUEUE_GENERATION_KEY, 0))
        pending = PendingMap(int(marks.get(PENDING_FLOOR_KEY, 0)))
        saved_generation, _, saved_map = str(marks.get(PENDING_MAP_KEY, "")).partition("/")
        # a map saved one generation back is still good with the rows that one retry changed
        requeued = _requeued_runs(marks.get(REQUEUED_KEY), generation, generation - 1)
        if saved_map and (saved_generation == str(generation)
                          or (requeued is not None and saved_generation == str(generation - 1))):
            try:
                pending = PendingMap.decode(saved_map)
            except ValueError:  # hand-edited or damaged: the floor alone is always safe
                log.warning("queue %s: ignoring an unreadable saved pending map", self.path)
            else:
                if saved_generation != str(generation):
                    pending.add(requeued or ())
        return max(largest, int(high_water[0]) if high_water else 0), pending, generation

    def _stored_horizon(self) -> float:
        """A receive time no row stored before this open exceeds (-inf for an empty table): the
        newest of the last rows by id, plus a margin for rows committed out of receive order."""
        newest = self._conn.execute(_NEWEST_RECEIVED_SQL, (self._last_id - _HORIZON_ROWS,)).fetchone()[0]
        return -math.inf if newest is None else float(newest) + _HORIZON_MARGIN_S

    @property
    def _floor(self) -> int:
        """No row below this id is pending."""
        return self._pending.floor

    def _sync_marks(self, conn: sqlite3.Connection, *, save_floor: bool) -> int:
        """Apply a `retry_failed` (maybe another process's; a new requeue generation: add the
        rows it changed to the pending map, or when they are not known, lower the floor to the
        saved one), and with `save_floor` save ours (inside the caller's write transaction, so
        no retry can slip between the check and the write). Returns the generation."""
        marks = dict(conn.execute(_MARKS_SQL))
        generation = int(marks.get(REQUEUE_GENERATION_KEY, 0))
        if generation != self._generation:
            requeued = _requeued_runs(marks.get(REQUEUED_KEY), generation, self._generation)
            if requeued is None:
                self._pending.lower_floor(int(marks.get(PENDING_FLOOR_KEY, 0)))
            else:
                self._pending.add(requeued)
            self._generation = generation
        if save_floor:
            floor = self._pending.floor
            if marks.get(PENDING_FLOOR_KEY) != str(floor):
                conn.execute(_SET_META_SQL, (PENDING_FLOOR_KEY, floor))
            encoded = self._pending.encode()
            saved = None if encoded is None else f"{generation}/{encoded}"
            if saved != marks.get(PENDING_MAP_KEY):
                if saved is None:
                    conn.execute(_DELETE_META_SQL, (PENDING_MAP_KEY,))
                else:
                    conn.execute(_SET_META_SQL, (PENDING_MAP_KEY, saved))
        return generation

    def _check_not_too_new(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"queue database {self.path} has schema version {version}, but this medagent "
                f"understands up to {SCHEMA_VERSION}; upgrade medagent or point data_dir elsewhere"
            )

    def _ensure_queue_uuid(self) -> str:
        def create(conn: sqlite3.Connection) -> str:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('queue_uuid', ?)", (uuid.uuid4().hex,))
            return str(conn.execute("SELECT value FROM meta WHERE key = 'queue_uuid'").fetchone()[0])

        row = self._conn.execute("SELECT value FROM meta WHERE key = 'queue_uuid'").fetchone()
        return str(row[0]) if row else self._write(create)

    @property
    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        """Move the journal's records into SQLite (if it can: else they stay in the journal and
        the next open replays them), close the journal and the connection (idempotent).
        Uncommitted work is rolled back."""
        if self._journal is not None:
            with contextlib.suppress(QueueError):
                self.move_journal()
            self._journal.close()
            self._journal = None
        self._conn.close()

    # ----------------------------------------------------------------- intake journal

    def open_journal(self) -> int:
        """Replay the intake journal (docs/intake-journal.md) into SQLite and journal lone
        records from now on; returns the rows replayed. Only the lease holder may call it (a
        replay empties the file: another process's journal would lose records): the DurableQueue
        calls it right after taking the lease, before anything reads the queue. Raises
        QueueError (the file cannot be opened or read, or the replay's INSERT failed; the
        journal is then left as it was)."""
        path = self.journal_path
        try:
            journal = IntakeJournal(path)
        except OSError as exc:
            raise QueueError(f"cannot open intake journal {path}: {storage_error_reason(exc)}") from exc
        try:
            replayed = self._replay(journal)
        except BaseException:
            journal.close()
            raise
        self._journal = journal
        return replayed

    @property
    def journal_path(self) -> Path:
        return self.path.with_name(self.path.name + JOURNAL_SUFFIX)

    def _replay(self, journal: IntakeJournal) -> int:
        try:
            rows, torn = journal.read_rows()
        except OSError as exc:
            raise QueueError(f"cannot read intake journal {journal.path}: {storage_error_reason(exc)}") from exc
        if rows:
            rows = self._write(functools.partial(self._insert_journal_rows, rows))
        if rows or torn:
            log.warning("queue %s: intake journal replayed: %d records%s", self.path, len(rows),
                        f", a torn tail of {torn} bytes ignored" if torn else "")
        if journal.size or torn:
            try:
                journal.reset()
            except OSError as exc:
                raise QueueError(f"cannot empty intake journal {journal.path}: {storage_error_reason(exc)}") from exc
        return len(rows)

    def _insert_journal_rows(self, rows: list[JournalRow], conn: sqlite3.Connection) -> list[JournalRow]:
        """Inside a write transaction: INSERT OR IGNORE replayed journal rows; returns those
        considered. A row at or below the id high-water may have been moved and deleted since (a
        journal left full after its move committed): it is never brought back."""
        high_water = conn.execute(f"SELECT value FROM meta WHERE key = '{ID_HIGH_WATER_KEY}'").fetchone()
        floor = int(high_water[0]) if high_water else 0
        rows = [row for row in rows if row[0] > floor]
        conn.executemany(_INSERT_OR_IGNORE_SQL, rows)
        if self._key_filter is not None:
            for row in rows:  # (id, channel, remote, sender, control_id, ..., received_at at 8)
                if row[4]:
                    self._key_filter.add((row[1], row[3], row[4]), row[8])
        ids = sorted(row[0] for row in rows)
        if ids:
            self._last_id = max(self._last_id, ids[-1])
            self._pending.add(id_runs(ids))
        return rows

    def _adopt_orphaned_journal(self) -> None:
        """Read a journal whose writer holds no live lease (killed) into SQLite, without
        emptying it (only a lease holder does: `open_journal` replays it again, idempotently).
        The lease is checked inside the write transaction, which a starting queue's lease
        acquisition cannot overlap. Best effort: a failure is one log line."""
        path = self.journal_path
        try:
            if path.stat().st_size == 0:
                return
        except OSError:
            return
        host = socket.gethostname()

        def work(conn: sqlite3.Connection) -> int:
            lease = conn.execute("SELECT host, pid, expires_at FROM lease WHERE id = 1").fetchone()
            if lease is not None and lease[2] > time.time() and not (lease[0] == host and _pid_is_dead(lease[1])):
                return 0  # a live writer's journal is its own
            rows, _good = decode_frames(path.read_bytes())
            return len(self._insert_journal_rows(rows, conn))

        try:
            adopted = self._write(work)
        except (QueueError, OSError) as exc:
            log.warning("queue %s: cannot read the intake journal left by a stopped agent: %s", self.path,
                        exc.reason if isinstance(exc, StorageError) else storage_error_reason(exc))
            return
        if adopted:
            log.warning("queue %s: read %d records from the intake journal of a stopped agent", self.path, adopted)

    @property
    def key_filter(self) -> KeyFilter | None:
        """The duplicate check's in-memory key filter (None: turned off)."""
        return self._key_filter

    @property
    def journal_records(self) -> int:
        """Records in the journal and not yet in SQLite."""
        return len(self._residents)

    def move_journal(self) -> None:
        """Move the journal's records into SQLite (one transaction), then empty it; a no-op when
        it holds none. Every write transaction does this first (`_write`), and every read of
        the queue's rows calls it, so no reader or updater misses a journal record. Raises
        StorageError (the records stay in the journal)."""
        if self._residents:
            self._write(_no_work)

    def _move_residents(self, conn: sqlite3.Connection | sqlite3.Cursor) -> bool:
        """Inside a write transaction: INSERT the journal's records (explicit ids). True when there
        were any (then `_moved` must follow the COMMIT)."""
        if not self._residents:
            return False
        conn.executemany(_INSERT_OR_IGNORE_SQL, self._residents)
        return True

    def _moved(self) -> None:
        """After the COMMIT holding the journal's records: forget them and empty the file (only
        now: until this COMMIT the journal was their only copy)."""
        self._residents = []
        self._resident_keys = {}
        journal = self._journal
        if journal is not None:
            try:
                journal.reset()
            except OSError as exc:  # its records are all in SQLite: a replay ignores them
                journal.broken = True
                log.warning("queue %s: cannot empty the intake journal (%s); lone records go to SQLite until it can",
                            self.path, storage_error_reason(exc))

    def _journal_usable(self) -> bool:
        """False while the journal cannot take appends (a partial frame could not be cut off, or
        it could not be emptied after a move); each call tries to empty it again (after moving
        its records)."""
        journal = self._journal
        assert journal is not None
        if journal.broken:
            try:
                if self._residents:
                    self.move_journal()  # empties it when it can
                else:
                    journal.reset()
            except (QueueError, OSError):
                pass
        return not journal.broken

    def journal_batch(self, records: Sequence[InboundRecord], dedup: Sequence[DuplicatePolicy]) -> list[CommitResult] | None:
        """Commit `records` with one framed write() to the intake journal instead of SQLite:
        resolved against SQLite and the journal's records, then all their frames in one write
        (all or none: a short write is cut back). None when there is no journal or it cannot take
        appends (then insert_batch). Storage errors become the results' error.

        insert_batch does this for a lone record; the queue also does it for a group while a
        checkpoint holds the database (durable.py), so intake never waits for one."""
        journal = self._journal
        if journal is None or not self._journal_usable():
            return None
        now = time.time()
        try:
            results, rows = self._resolve(records, dedup, now)
        except sqlite3.Error as exc:
            return [CommitResult(None, None, storage_error_reason(exc))] * len(records)
        if not rows:
            return results
        try:
            journal.append(b"".join([encode_frame(row) for row in rows]))
        except (OSError, UnicodeError) as exc:
            reason = "invalid text in a record field" if isinstance(exc, UnicodeError) else storage_error_reason(exc)
            failed = CommitResult(None, None, reason)
            return [failed if result.row_id is not None else result for result in results]
        self._last_id = rows[-1][0]
        self._residents.extend(rows)
        keys = self._resident_keys
        for record, result in zip(records, results):
            if result.row_id is not None and record.control_id:
                keys.setdefault((record.channel, record.sender, record.control_id), []).append(
                    (result.row_id, record.received_at, content_key(record)))
        return results

    # ----------------------------------------------------------------- transactions

    def _rollback_quietly(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _write(self, work: Callable[[sqlite3.Connection], _T], *, move: bool = True) -> _T:
        """Run `work` in one BEGIN IMMEDIATE transaction, after moving the intake journal's
        records (unless `move` is false); sqlite errors become StorageError."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            moved = move and self._move_residents(conn)  # journal records first: `work` may update them
            result = work(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback_quietly()
            reason = storage_error_reason(exc)
            raise StorageError(f"queue database {self.path}: {reason}", reason) from exc
        except BaseException:
            self._rollback_quietly()
            raise
        if moved:
            self._moved()
        return result

    # ----------------------------------------------------------------- intake (hot path)

    def insert_batch(
        self,
        records: Sequence[InboundRecord],
        dedup: Sequence[DuplicatePolicy],
        *,
        confirm_ids: Sequence[int] = (),
    ) -> list[CommitResult]:
        """Insert `records` in one transaction, applying each one's duplicate policy, and mark
        `confirm_ids` CONFIRMED in the same transaction (one commit instead of two on the path
        that gates the devices' ACKs).

        Never raises for storage errors: on any sqlite error the transaction is rolled back (the
        confirmations too) and every result carries `error`. With the intake journal open, a lone
        record without confirmations is written to the journal instead (module docstring); a
        group's transaction moves the journal's records first.
        """
        if len(records) != len(dedup):
            raise ValueError("insert_batch needs one DuplicatePolicy per record")
        if not records:
            return []
        cursor = self._cursor
        alone = len(records) == 1 and not confirm_ids  # one autocommit INSERT (module docstring)
        if alone and (journaled := self.journal_batch(records, dedup)) is not None:
            return journaled
        moved = False
        try:
            now = time.time()
            if not alone:
                cursor.execute("BEGIN IMMEDIATE")
                moved = self._move_residents(cursor)
            elif self._residents:  # a journal that cannot take appends: its records go first
                self.move_journal()
            results, rows = self._resolve(records, dedup, now)
            if len(rows) == 1:
                cursor.execute(_INSERT_SQL, rows[0])
            elif rows:
                cursor.executemany(_INSERT_SQL, rows)
            confirmed = _confirm_params(confirm_ids, now) if confirm_ids else ()
            if confirmed:
                cursor.executemany(_CONFIRM_SQL, confirmed)
            if not alone:
                cursor.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback_quietly()
            if isinstance(exc, sqlite3.IntegrityError):  # an id taken behind our back: never hand it out
                with contextlib.suppress(sqlite3.Error):
                    self._last_id = max(self._last_id, self._read_marks()[0])
            failed = CommitResult(None, None, storage_error_reason(exc))
            return [failed] * len(records)
        except StorageError as exc:  # the move of the journal's records before a lone INSERT
            return [CommitResult(None, None, exc.reason)] * len(records)
        if moved:
            self._moved()
        if rows:
            self._last_id = rows[-1][0]
        if confirmed:
            self._settle(confirmed)
        return results

    def _settle(self, confirmed: Iterable[tuple[float, int, int]]) -> None:
        """Committed confirmations leave the pending map (the tail follows the hub)."""
        for _now, first, last in confirmed:
            self._pending.settle(first, last, self._last_id)

    def _resolve(
        self, records: Sequence[InboundRecord], dedup: Sequence[DuplicatePolicy], now: float
    ) -> tuple[list[CommitResult], list[tuple[Any, ...]]]:
        """Resolve duplicates (one lookup query per chunk, in-batch repeats in Python) and build
        the rows to insert, with ids from the store's counter (it advances once they committed).

        A record is a duplicate of the oldest row in its window with the same key and content; a
        row with the same key but other content makes it a reused control id (a new message)."""
        off, drop = DuplicatePolicy.OFF, DuplicatePolicy.DROP
        checks_duplicates = any(policy is not off for policy in dedup)
        earlier = self._earlier_rows(records) if checks_duplicates else {}
        window = self.dedup_window_s
        key_filter = self._key_filter
        next_id = self._last_id
        rows: list[tuple[Any, ...]] = []
        results: list[CommitResult] = []
        for record, policy in zip(records, dedup):
            file = record.file
            if file is None:
                file_columns: tuple[Any, ...] = _NO_FILE
                content: bytes | str = record.body
            elif (problem := spool_path_problem(file.path)) is None:
                file_columns = (file.path, file.size, file.sha256)
                content = file.sha256.lower()
            else:  # refused alone: the rest of the group is fine (a channel's bug, not PHI)
                results.append(CommitResult(None, None, f"invalid file payload path: {problem}"))
                continue
            duplicate_of: int | None = None
            reused = False
            # built once: the duplicate check and the key filter both use it
            key = (record.channel, record.sender, record.control_id) if record.control_id else None
            # rare: a resend or a reused id
            if checks_duplicates and key is not None and policy is not off and key in earlier:
                cutoff = record.received_at - window
                for row_id, received_at, row_content in earlier[key]:
                    if received_at >= cutoff:
                        if row_content == content:
                            duplicate_of = row_id
                            break
                        reused = True
                if duplicate_of is not None:
                    reused = False  # an exact resend of one of the earlier messages
                    if policy is drop:
                        results.append(CommitResult(None, duplicate_of))
                        continue
            next_id += 1
            rows.append((
                next_id, record.channel, record.remote, record.sender, record.control_id, record.message_type,
                record.content_type, record.body, record.received_at, duplicate_of, now, *file_columns,
            ))
            results.append(CommitResult(next_id, duplicate_of, None, reused))
            if key is not None:
                if checks_duplicates:
                    earlier.setdefault(key, []).append((next_id, record.received_at, content))
                if key_filter is not None:
                    key_filter.add(key, record.received_at)
        return results, rows

    def _earlier_rows(
        self, records: Sequence[InboundRecord]
    ) -> dict[tuple[str, str, str], list[tuple[int, float, bytes | str]]]:
        """(channel, sender, control_id) -> [(id, received_at, content), ...] of non-FAILED rows
        that could be inside the window of some record, in id order; one query per
        _LOOKUP_CHUNK records."""
        found: dict[tuple[str, str, str], list[tuple[int, float, bytes | str]]] = {}
        seen: set[int] = set()
        oldest = min(record.received_at for record in records) - self.dedup_window_s
        keyed = [r for r in records if r.control_id]
        asked = keyed
        if self._key_filter is not None and self._key_filter.covers(oldest):
            maybe = self._key_filter.may_contain
            asked = [r for r in keyed if maybe((r.channel, r.sender, r.control_id), oldest)]
        for start in range(0, len(asked), _LOOKUP_CHUNK):
            chunk = asked[start : start + _LOOKUP_CHUNK]
            params: list[Any] = []
            for record in chunk:
                params += (record.channel, record.sender, record.control_id)
            params.append(oldest)
            sql = _dedup_sql(len(chunk))
            for row_id, channel, sender, control_id, received_at, content in self._cursor.execute(sql, params):
                if row_id not in seen:  # a key asked twice matches twice
                    seen.add(row_id)
                    found.setdefault((channel, sender, control_id), []).append((row_id, received_at, content))
        if self._resident_keys:  # the journal's records (newer than every row in SQLite; never FAILED)
            for record in keyed:
                key = (record.channel, record.sender, record.control_id)
                for entry in self._resident_keys.get(key, ()):
                    if entry[0] not in seen and entry[1] >= oldest:
                        seen.add(entry[0])
                        found.setdefault(key, []).append(entry)
        return found

    # ----------------------------------------------------------------- delivery side

    def load_pending(self, after_id: int, limit: int, *, up_to_id: int | None = None) -> list[QueuedMessage]:
        """Up to `limit` RECEIVED/SENT rows with after_id < id (<= up_to_id), in id order:
        rowid range walks over the pending map's runs above `after_id`, then its tail."""
        self.move_journal()
        rows = self._walk_pending(_QUEUED_COLUMNS, after_id, limit, up_to_id)
        return [_queued(row) for row in rows]

    def _walk_pending(self, columns: str, after_id: int, limit: int, up_to_id: int | None) -> list[Any]:
        """Rows (first column: id) of up to `limit` pending rows after `after_id`; what a walk
        saw tightens the map (a run walked to its end keeps only the pending ids it found)."""
        rows: list[Any] = []
        with _reading(self.path):
            for first, last, is_tail in list(self._pending.spans(after_id, up_to_id)):
                wanted = limit - len(rows)
                if wanted <= 0:
                    break
                if last is None:
                    found = self._conn.execute(_WALK_FROM_SQL.format(columns=columns), (first, wanted)).fetchall()
                else:
                    found = self._conn.execute(_WALK_RANGE_SQL.format(columns=columns),
                                               (first, last, wanted)).fetchall()
                rows += found
                if is_tail:
                    if found and first == self._pending.tail:
                        self._pending.walked_tail([row[0] for row in found])
                elif len(found) < wanted:  # the whole span was walked
                    self._pending.learn(first, last, [row[0] for row in found])  # type: ignore[arg-type]
                elif found:
                    self._pending.learn(first, found[-1][0], [row[0] for row in found])
        return rows

    def _set_state(self, ids: Iterable[int], state: RowState, only_from: str) -> int:
        now = time.time()
        sql = f"UPDATE messages SET state = {int(state)}, updated_at = ? WHERE id = ? AND {only_from}"
        params = [(now, row_id) for row_id in ids]
        if not params:
            return 0
        return self._write(lambda conn: conn.executemany(sql, params).rowcount)

    def mark_sent(self, ids: Iterable[int]) -> int:
        """RECEIVED -> SENT (possibly delivered). Returns rows changed."""
        return self._set_state(ids, RowState.SENT, f"state = {int(RowState.RECEIVED)}")

    def mark_confirmed(self, ids: Iterable[int]) -> int:
        """Any state -> CONFIRMED: the hub has the message. Returns rows changed."""
        params = _confirm_params(ids, time.time())
        if not params:
            return 0
        changed = self._write(lambda conn: conn.executemany(_CONFIRM_SQL, params).rowcount)
        self._settle(params)
        return changed

    def requeue(self, ids: Iterable[int]) -> int:
        """SENT -> RECEIVED (attempts kept). Returns rows changed."""
        return self._set_state(ids, RowState.RECEIVED, f"state = {int(RowState.SENT)}")

    def requeue_sent(self) -> int:
        """Every SENT row back to RECEIVED: they were in flight when the last process stopped."""
        sql = (f"UPDATE messages SET state = {int(RowState.RECEIVED)}, updated_at = ?"
               f" WHERE id BETWEEN ? AND ? AND state = {int(RowState.SENT)}")
        now = time.time()
        spans = [(now, first, _MAX_ROWID if last is None else last) for first, last, _ in self._pending.spans(0, None)]
        return self._write(lambda conn: conn.executemany(sql, spans).rowcount)

    def mark_failed(self, row_id: int, reason: str) -> int:
        """A pending row -> FAILED with `reason` (no PHI). Returns rows changed (0 or 1)."""
        sql = (
            f"UPDATE messages SET state = {int(RowState.FAILED)}, last_error = ?, updated_at = ?"
            f" WHERE id = ? AND {_PENDING_FILTER}"
        )
        changed = self._write(lambda conn: conn.execute(sql, (reason, time.time(), row_id)).rowcount)
        self._pending.settle(row_id, row_id, self._last_id)
        return changed

    def increment_attempts(self, ids: Iterable[int]) -> int:
        """attempts + 1 for each id (an id listed twice counts twice). Returns rows changed."""
        params = [(row_id,) for row_id in ids]
        if not params:
            return 0
        sql = "UPDATE messages SET attempts = attempts + 1 WHERE id = ?"
        return self._write(lambda conn: conn.executemany(sql, params).rowcount)

    # ----------------------------------------------------------------- operator actions

    def first_pending_id(self) -> int | None:
        """Smallest id of a RECEIVED/SENT row, or None; moves the pending floor up to it (or past
        the newest row when nothing is pending)."""
        self.move_journal()
        pending = self._pending
        while pending.runs:  # the runs first: usually one old row, found without walking the rest
            found = self._walk_pending("id", 0, 1, pending.runs[0][1])
            if found:
                return found[0][0]  # type: ignore[no-any-return]
        with _reading(self.path):
            first, newest = self._conn.execute(_FIRST_PENDING_SQL, (pending.tail,)).fetchone()
        pending.raise_tail(first if first is not None else min((newest or 0), self._last_id) + 1)
        return first  # type: ignore[no-any-return]

    def list_failed(self, limit: int = 100) -> list[dict[str, Any]]:
        """FAILED rows, oldest first, without bodies (`size` is the body length)."""
        sql = f"SELECT {_INFO_COLUMNS} FROM messages WHERE state = {int(RowState.FAILED)} ORDER BY id LIMIT ?"
        with _reading(self.path):
            return [self._row_info(row) for row in self._conn.execute(sql, (limit,))]

    @staticmethod
    def _row_info(row: Sequence[Any]) -> dict[str, Any]:
        info = dict(zip(_INFO_KEYS, row))
        if info["file"] is None:
            del info["file"], info["file_size"]
        info["state"] = RowState(info["state"]).name.lower()
        return info

    def retry_failed(self, ids: Sequence[int] | None = None) -> int:
        """FAILED -> RECEIVED (all, or the given ids); bumps the requeue generation so a running
        DurableQueue reloads them. Returns rows changed."""
        base = f"UPDATE messages SET state = {int(RowState.RECEIVED)}, updated_at = ? WHERE state = {int(RowState.FAILED)}"
        now = time.time()

        def work(conn: sqlite3.Connection) -> int:
            if ids is None:  # one table scan (admin only), returning the ids it changed
                changed = [row_id for (row_id,) in conn.execute(base + " RETURNING id", (now,))]
            else:
                changed = [i for i in ids if conn.execute(base + " AND id = ? RETURNING id", (now, i)).fetchone()]
            if not changed:
                return 0
            self._sync_marks(conn, save_floor=False)  # earlier retries first: ours is the next generation
            runs = id_runs(changed)
            generation = self._generation + 1
            # rows below the pending floor may be pending again: every store lowers its floor, or
            # (knowing which rows) adds them to its pending map; saved maps of older generations
            # are ignored from now on
            conn.execute(_LOWER_FLOOR_SQL, (runs[0][0],))
            conn.execute(_SET_META_SQL, (REQUEUE_GENERATION_KEY, generation))
            saved = encode_runs(runs)
            if saved is None:
                conn.execute(_DELETE_META_SQL, (REQUEUED_KEY,))
            else:
                conn.execute(_SET_META_SQL, (REQUEUED_KEY, f"{generation}/{saved}"))
            self._pending.add(runs)
            self._generation = generation
            return len(changed)

        return self._write(work)

    def requeue_generation(self) -> int:
        """Counter bumped whenever rows are put back to RECEIVED behind a running queue's back
        (reading a new one also lowers this store's pending floor to theirs)."""
        with _reading(self.path):
            return self._sync_marks(self._conn, save_floor=False)

    def purge(self, states: Iterable[RowState], older_than_s: float | None = None) -> int:
        """Delete rows in `states` (settled ones only: CONFIRMED, FAILED) last changed more than
        `older_than_s` ago (all when None). Returns rows deleted."""
        wanted = sorted({RowState(s) for s in states})
        pending = [s.name.lower() for s in wanted if s in (RowState.RECEIVED, RowState.SENT)]
        if pending:
            raise QueueError(
                f"refusing to purge {'/'.join(pending)} rows: they are not delivered yet; "
                "only 'confirmed' and 'failed' rows can be purged"
            )
        cutoff = math.inf if older_than_s is None else time.time() - older_than_s
        with _reading(self.path):
            return sum(self._delete_settled(state, cutoff) for state in wanted)

    # ----------------------------------------------------------------- retention

    def sweep(
        self,
        retention_days: float,
        retention_max_mb: float,
        failed_retention_days: float,
        *,
        chunk_rows: int = 5000,
        max_rows: int | None = None,
    ) -> int:
        """Apply retention (see module docstring). Returns rows deleted.

        With `max_rows`, stop once about that many rows were deleted (call again while it
        returns >= max_rows), so a caller can interleave other writes with a long sweep.
        """
        self.move_journal()
        now = time.time()
        budget = math.inf if max_rows is None else float(max_rows)
        with _reading(self.path):
            deleted = self._delete_settled(RowState.CONFIRMED, now - retention_days * _DAY_S, chunk_rows, budget)
            if deleted < budget:
                deleted += self._trim_to_size(retention_max_mb * _MIB, chunk_rows, budget - deleted)
            if deleted < budget:
                deleted += self._delete_settled(
                    RowState.FAILED, now - failed_retention_days * _DAY_S, chunk_rows, budget - deleted
                )
        return deleted

    def sweep_slice(
        self,
        retention_days: float,
        retention_max_mb: float,
        failed_retention_days: float,
        *,
        chunk_rows: int = 2000,
        scan_rows: int = 20_000,
    ) -> tuple[int, bool]:
        """One bounded step of an incremental retention pass: the same rules as `sweep`, but a
        step deletes at most `chunk_rows` rows, examines at most `scan_rows` ids, and stops once
        it worked `step_budget_s` (the agent runs steps between intake commits on its event
        loop: a step is an intake stall, and its cost must not grow with the table).
        Returns (rows deleted, whether the pass is complete). The position is kept between calls
        (in this object): phase 0 walks the ids once for both age rules (old CONFIRMED, old
        FAILED), phase 1 trims to size (spool usage counted once per pass)."""
        self.move_journal()
        now = time.time()
        deadline = time.perf_counter() + self.step_budget_s
        cutoffs = {RowState.CONFIRMED: now - retention_days * _DAY_S,
                   RowState.FAILED: now - failed_retention_days * _DAY_S}
        finished = False
        with _reading(self.path):
            if self._pass_phase == 0:
                deleted, ended = self._age_walk(cutoffs, chunk_rows, scan_rows, deadline)
                if ended:
                    self._pass_phase, self._pass_cursor, self._pass_spool_bytes = 1, 0, None
            else:
                deleted = self._trim_slice(retention_max_mb * _MIB, chunk_rows)
                if deleted == 0:
                    self._pass_phase, self._pass_cursor, finished = 0, 0, True
        return deleted, finished

    def _age_walk(self, cutoffs: dict[RowState, float], chunk_rows: int, scan_rows: int, deadline: float
                  ) -> tuple[int, bool]:
        """Delete rows of the states in `cutoffs` settled before their cutoff, reading the ids
        after the pass cursor in sub-windows until `scan_rows` ids were read, `chunk_rows` rows
        deleted or `deadline` (perf_counter) passed; (deleted, whether the walk reached the end)."""
        if self._pass_cursor == 0:  # start at the oldest row: ids are never reused, the table may start late
            first = self._conn.execute("SELECT min(id) FROM messages").fetchone()[0]
            self._pass_cursor = 0 if first is None else first - 1
        states = sorted(cutoffs)
        match = " OR ".join(f"(state = {int(state)} AND updated_at < ?)" for state in states)
        select = f"SELECT id, state FROM messages WHERE id > ? AND id <= ? AND ({match}) ORDER BY id LIMIT ?"
        scanned = deleted = 0
        while True:
            low = self._pass_cursor
            high = low + max(1, min(_AGE_SUBWINDOW_IDS, scan_rows - scanned))
            limit = chunk_rows - deleted
            rows = self._conn.execute(select, (low, high, *(cutoffs[s] for s in states), limit)).fetchall()
            for state in states:
                ids = [row_id for row_id, row_state in rows if row_state == state]
                if ids:
                    deleted += self._delete_ids(ids, state)
            if len(rows) == limit:  # more may wait in this sub-window: continue after the last one
                self._pass_cursor = rows[-1][0]
                return deleted, False
            self._pass_cursor, scanned = high, scanned + high - low
            last = self._conn.execute("SELECT max(id) FROM messages").fetchone()[0]  # rowid b-tree: O(log n)
            if last is None or high >= last:
                return deleted, True
            if scanned >= scan_rows or time.perf_counter() >= deadline:
                return deleted, False

    def _trim_slice(self, max_bytes: float, chunk_rows: int) -> int:
        """One chunk of `_trim_to_size`, with the spool usage scanned once per pass and the
        chunk sized so it takes about `step_budget_s` at the cost per row the last one took."""
        if self._pass_spool_bytes is None:  # a table scan, unless no file payload exists at all
            self._pass_spool_bytes = 0 if self._spool_is_empty() else self.spool_usage()[1]
        if self.used_bytes() + self._pass_spool_bytes <= max_bytes:
            return 0
        rows = max(_TRIM_MIN_ROWS, int(self.step_budget_s / self._trim_row_cost_s))
        started = time.perf_counter()
        deleted, freed, self._pass_cursor = self._trim_chunk(max_bytes, min(chunk_rows, rows),
                                                             self._pass_spool_bytes, self._pass_cursor)
        if deleted:
            self._trim_row_cost_s = max(1e-6, (time.perf_counter() - started) / deleted)
        self._pass_spool_bytes -= freed
        return deleted

    def _delete_settled(
        self, state: RowState, updated_before: float, chunk_rows: int = 5000, budget: float = math.inf
    ) -> int:
        """Delete `state` rows with updated_at < updated_before, one id-ordered chunk per
        transaction, walking the table once; stops after about `budget` rows."""
        select = (
            f"SELECT id FROM messages WHERE id > ? AND state = {int(state)} AND updated_at < ?"
            " ORDER BY id LIMIT ?"
        )
        cursor_id, deleted = 0, 0
        while deleted < budget:
            limit = int(min(chunk_rows, budget - deleted))
            ids = [r[0] for r in self._conn.execute(select, (cursor_id, updated_before, limit))]
            if ids:
                deleted += self._delete_ids(ids, state)
                cursor_id = ids[-1]
            if len(ids) < limit:
                break
        return deleted

    def _delete_ids(self, ids: Sequence[int], state: RowState) -> int:
        return self._delete_rows(ids, state)[0]

    def _delete_rows(self, ids: Sequence[int], state: RowState) -> tuple[int, int]:
        """Delete rows (one transaction), then, once that committed, their payload files.
        Returns (rows deleted, bytes of payload files they referenced)."""
        sql = f"DELETE FROM messages WHERE id = ? AND state = {int(state)}"
        wanted = set(ids)
        files_sql = (  # a rowid range walk over the rows being deleted (their pages are read anyway)
            "SELECT id, file_path, file_size FROM messages"
            f" WHERE id BETWEEN ? AND ? AND file_path IS NOT NULL AND state = {int(state)}"
        )

        def work(conn: sqlite3.Connection) -> tuple[int, list[tuple[str, int]]]:
            files = [(path, size or 0) for row_id, path, size in conn.execute(files_sql, (min(ids), max(ids)))
                     if row_id in wanted]
            deleted = conn.executemany(sql, [(i,) for i in ids]).rowcount
            conn.execute(_RAISE_HIGH_WATER_SQL, (max(ids),))  # ids are never reused (module docstring)
            self._sync_marks(conn, save_floor=True)
            return deleted, files

        deleted, files = self._write(work)
        self._unlink_payloads(path for path, _ in files)
        return deleted, sum(size for _, size in files)

    def _payload_file(self, relative: str) -> Path | None:
        """Absolute path of a stored file reference, or None if it does not point into the spool."""
        if spool_path_problem(relative) is not None:
            return None
        return self.data_dir.joinpath(*PurePosixPath(relative).parts)

    def _unlink_payloads(self, relatives: Iterable[str]) -> int:
        removed = 0
        for relative in relatives:
            path = self._payload_file(relative)
            if path is None:
                log.warning("queue %s: not deleting payload file outside the spool: %r", self.path, relative)
                continue
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:  # left as an orphan: the next orphan sweep tries again
                log.warning("queue %s: cannot delete payload file %s: %s", self.path, relative, exc)
        return removed

    def referenced_files(self) -> set[str]:
        """Every file payload path some row references (any state)."""
        self.move_journal()  # a journal record's file is referenced too
        with _reading(self.path):
            return {
                path for (path,) in self._conn.execute(
                    "SELECT file_path FROM messages WHERE file_path IS NOT NULL"  # a table scan: open and hourly
                )
            }

    def _spool_is_empty(self) -> bool:
        """No file below ``<data_dir>/spool`` (stops at the first one): then no row's file takes
        space, and the scans for referenced files can be skipped (HL7-only queues)."""
        for _directory, _subdirs, names in os.walk(self.data_dir / SPOOL_DIRNAME):
            if names:
                return False
        return True

    def sweep_orphan_files(self, older_than_s: float = 0.0) -> tuple[int, int]:
        """Delete files below ``<data_dir>/spool`` that no row references and that were last
        modified more than `older_than_s` ago (a channel may be writing a file it has not
        submitted yet). Returns (files removed, bytes freed)."""
        spool = self.data_dir / SPOOL_DIRNAME
        if not spool.is_dir() or self._spool_is_empty():  # nothing to remove: skip the table scan
            return 0, 0
        referenced = self.referenced_files()
        cutoff = time.time() - older_than_s
        removed = freed = 0
        for directory, _subdirs, names in os.walk(spool):
            for name in names:
                path = Path(directory, name)
                relative = path.relative_to(self.data_dir).as_posix()
                if relative in referenced:
                    continue
                try:
                    st = path.lstat()
                    if not os.path.isfile(path) or path.is_symlink() or st.st_mtime > cutoff:
                        continue
                    path.unlink()
                except OSError:
                    continue
                removed += 1
                freed += st.st_size
        if removed:
            log.info("queue %s: removed %d orphaned spool files (%d bytes)", self.path, removed, freed)
        return removed, freed

    def spool_usage(self) -> tuple[int, int]:
        """(files, bytes) of file payloads referenced by rows (a table scan)."""
        self.move_journal()
        with _reading(self.path):
            files, size = self._conn.execute(
                "SELECT count(file_path), coalesce(sum(file_size), 0) FROM messages WHERE file_path IS NOT NULL"
            ).fetchone()
        return int(files), int(size)

    def used_bytes(self) -> int:
        """Bytes of live data in the database (pages in use, excluding the free list)."""
        conn = self._conn
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages * page_size)

    def page_headroom_bytes(self) -> int | None:
        """Bytes the database may still grow by under `max_db_mb` (None when unlimited): free
        pages plus pages below the limit. Lets a storage probe see a full *database* as full."""
        conn = self._conn
        max_pages = conn.execute("PRAGMA max_page_count").fetchone()[0]
        page_count = conn.execute("PRAGMA page_count").fetchone()[0]
        if max_pages >= 0x3FFFFFFF:  # SQLite's default limit (1073741823 pages): effectively unlimited
            return None
        free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((max_pages - page_count + free_pages) * conn.execute("PRAGMA page_size").fetchone()[0])

    def _trim_to_size(self, max_bytes: float, chunk_rows: int, budget: float = math.inf) -> int:
        """Delete the oldest CONFIRMED rows while the live data (pages plus spool files) exceeds
        max_bytes."""
        deleted, cursor_id = 0, 0
        spool_bytes = self.spool_usage()[1]  # once; then less what each chunk's files freed
        while deleted < budget:
            chunk_deleted, freed, cursor_id = self._trim_chunk(
                max_bytes, int(min(chunk_rows, budget - deleted)), spool_bytes, cursor_id)
            if not chunk_deleted:
                break
            deleted += chunk_deleted
            spool_bytes -= freed
        return deleted

    def _trim_chunk(self, max_bytes: float, chunk_rows: int, spool_bytes: int, after_id: int
                    ) -> tuple[int, int, int]:
        """Delete up to `chunk_rows` of the oldest CONFIRMED rows with id > `after_id`, about as
        many as bring the live data (pages plus `spool_bytes`) down to max_bytes; (rows deleted,
        spool bytes freed, the cursor for the next chunk)."""
        excess = self.used_bytes() + spool_bytes - max_bytes
        if excess <= 0 or chunk_rows < 1:
            return 0, 0, after_id
        confirmed = int(RowState.CONFIRMED)
        average_body = self._conn.execute(
            "SELECT avg(length(body) + coalesce(file_size, 0)) FROM (SELECT body, file_size FROM messages"
            f" WHERE id > ? AND state = {confirmed} ORDER BY id LIMIT 64)", (after_id,)
        ).fetchone()[0]
        if average_body is None:  # no CONFIRMED rows left: pending rows are never trimmed
            return 0, 0, after_id
        estimate = math.ceil(excess / (float(average_body) + 200.0))  # + row and index overhead
        limit = int(max(1, min(chunk_rows, estimate)))
        ids = [r[0] for r in self._conn.execute(
            f"SELECT id FROM messages WHERE id > ? AND state = {confirmed} ORDER BY id LIMIT ?", (after_id, limit))]
        if not ids:
            return 0, 0, after_id
        deleted, freed = self._delete_rows(ids, RowState.CONFIRMED)
        return deleted, freed, ids[-1]

    # ----------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any]:
        """Counts by state, per-channel pending depth and oldest pending age, sizes, queue_uuid.

        Counting by state reads the whole table: call it from admin commands and timers, not
        per message.
        """
        self.move_journal()
        with _reading(self.path):
            return self._collect_stats()

    def _collect_stats(self) -> dict[str, Any]:
        conn = self._conn
        now = time.time()
        by_state = {state.name.lower(): 0 for state in RowState}
        spool_files = spool_bytes = 0
        for state, count, files, size in self._count_by_state():
            by_state[RowState(state).name.lower()] += count
            spool_files += files
            spool_bytes += size
        channels = {
            channel: {"pending": count, "oldest_pending_age_s": max(0.0, now - oldest)}
            for channel, count, oldest in conn.execute(
                "SELECT channel, count(*), min(received_at) FROM messages NOT INDEXED"  # a rowid range walk
                f" WHERE id >= ? AND {_PENDING_FILTER}"
                " GROUP BY channel", (self._floor,)
            )
        }
        return {
            "queue_uuid": self.queue_uuid,
            "path": str(self.path),
            "schema_version": self.schema_version,
            "durability": self.durability,
            "states": by_state,
            "pending": by_state["received"] + by_state["sent"],
            "channels": channels,
            "db_size_bytes": self._file_bytes(),
            "db_used_bytes": self.used_bytes(),
            "spool_files": spool_files,
            "spool_bytes": spool_bytes,
        }

    def _count_by_state(self) -> Iterator[tuple[int, int, int, int]]:
        """(state, rows, file rows, file bytes) per id range of `_STATS_RANGE_IDS`, one short
        read transaction each (see there), from the oldest row to the newest. Each row is counted
        once, in the state it had when its range was read; rows added meanwhile past the newest
        id read at the start are left to the next recount."""
        conn = self._conn
        # One aggregate per statement: SQLite reads min() or max() of the rowid from one end of
        # the b-tree only then (both in one SELECT is a table scan).
        low = conn.execute("SELECT min(id) FROM messages").fetchone()[0]
        high = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
        if low is None or high is None:
            return
        sql = ("SELECT state, count(*), count(file_path), coalesce(sum(file_size), 0) FROM messages"
               " WHERE id >= ? AND id < ? GROUP BY state")
        for start in range(low, high + 1, _STATS_RANGE_IDS):
            yield from conn.execute(sql, (start, start + _STATS_RANGE_IDS)).fetchall()

    def _file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", JOURNAL_SUFFIX):  # the intake journal's records are not in the database yet
            try:
                total += os.stat(str(self.path) + suffix).st_size
            except OSError:
                pass
        return total

    # ----------------------------------------------------------------- single-writer lease

    def acquire_lease(self, holder: str, ttl_s: float) -> None:
        """Take (or extend) the single-writer lease for `ttl_s` seconds.

        Raises QueueLocked when another holder's lease is live: not expired, and not left behind
        by a process that no longer exists on this host.
        """
        host = socket.gethostname()

        def work(conn: sqlite3.Connection) -> None:
            now = time.time()
            row = conn.execute("SELECT holder, host, pid, expires_at FROM lease WHERE id = 1").fetchone()
            if row is not None and row[0] != holder:
                other_holder, other_host, other_pid, expires_at = row
                abandoned = other_host == host and _pid_is_dead(other_pid)
                if expires_at > now and not abandoned:
                    raise QueueLocked(
                        f"queue database {self.path} is in use by {other_holder!r} (pid {other_pid} on "
                        f"{other_host}); stop that process, or wait {expires_at - now:.0f} s for its "
                        "lease to expire if it has died"
                    )
            conn.execute(
                "INSERT OR REPLACE INTO lease (id, holder, host, pid, acquired_at, expires_at)"
                " VALUES (1, ?, ?, ?, ?, ?)",
                (holder, host, os.getpid(), now, now + ttl_s),
            )
            # the holder's renewals save its pending floor: after a kill -9 the next holder's
            # first scan starts from at most one lease period behind
            self._sync_marks(conn, save_floor=True)

        self._write(work)

    def renew_lease(self, holder: str, ttl_s: float) -> None:
        """Extend our lease; raises QueueLocked if another holder took it meanwhile."""
        self.acquire_lease(holder, ttl_s)

    def release_lease(self, holder: str) -> None:
        """Give the lease up (only if `holder` holds it), saving the pending floor for the next
        holder (else its first scan walks from an older one)."""
        def work(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM lease WHERE id = 1 AND holder = ?", (holder,)).rowcount:
                self._sync_marks(conn, save_floor=True)

        try:
            self._write(work)
        except StorageError:
            if not self._residents:
                raise
            # The journal's records cannot go in (a full disk): they stay in the journal for the
            # next holder's replay, and the lease is given up all the same (a restart must not
            # wait for it to expire).
            self._write(work, move=False)

    def lease_info(self) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT holder, host, pid, acquired_at, expires_at FROM lease WHERE id = 1").fetchone()
        return dict(zip(("holder", "host", "pid", "acquired_at", "expires_at"), row)) if row else None
