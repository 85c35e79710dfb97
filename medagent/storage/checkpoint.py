"""Background WAL checkpoints, so the thread that commits never pays for them.

Theory of operation
-------------------
In WAL mode SQLite appends each commit to the `-wal` file and, by default, the committing
connection copies the WAL back into the database ("checkpoint") once it holds 1000 pages. That
copy ends with an fsync, and it happens inside some unlucky COMMIT: measured on the durable
queue under load it raised the p99 ACK latency from ~2 ms to ~6 ms. Here the writer connection
turns automatic checkpoints off (`wal_autocheckpoint=0`) and this thread, with a connection of
its own, runs `PRAGMA wal_checkpoint(PASSIVE)` every `interval_s`. PASSIVE never blocks the
writer; it copies what it can. When an owner asks for it with :meth:`request_truncate` (storage
ran full and the WAL's blocks should go back to the file system), or the WAL is idle, a TRUNCATE
checkpoint resets it to zero bytes; that one holds the writer out while it runs (see the end).

PASSIVE never restarts the WAL: the next writer does, and only if at its BEGIN every frame was
already copied. Under steady writes a round (0.5 s of commits, ~8 MB at 10 lock-step senders,
50-150 ms on a busy disk) never catches up with the commits made while it ran, so the WAL only
grew, and every ~4 s the size limit's TRUNCATE held the writer out for 190-240 ms: the 200-390
ms slowest ACKs of the soak (issue 19; the writer sleeps in SQLite's busy handler meanwhile).
So once the WAL holds more than `restart_above_bytes`, a RESTART checkpoint follows the PASSIVE
one: it holds the writer out only while it copies the few frames the PASSIVE left and syncs the
database (4-70 ms measured under load, waiting at most `_RESTART_WAIT_MS` for the writer and
old readers), and the next commit starts the WAL over from its first frame. The file keeps its
size (bounded by that threshold; appends then need no new blocks); TRUNCATE stays the backstop.

A RESTART (like TRUNCATE) syncs the WAL and then the database file, and it holds the writer out
until both returned. On a busy ext4 disk an fsync waits for a journal commit, which writes back
what was written since the last one (here: the frames committed while the PASSIVE ran, and other
processes' new blocks). Measured 2026-11-30 on the shared 2-core box, a writer committing without
pause: every commit over 100 ms overlapped a RESTART (120-320 ms) or a TRUNCATE (250-620 ms). So
before a RESTART or TRUNCATE this thread fsyncs the WAL and the database file itself, holding no
lock: the writer goes on committing, and the checkpoint's own syncs then wait only for what was
written in between (6 alternating 15 s pairs: 38 commits over 100 ms instead of 59, p999 lower
in 4 of 6; the longest one is unchanged when other processes' writes fill the journal). An extra
fsync is always safe: it makes durable what SQLite wrote, it never changes it.

A RESTART or TRUNCATE also waits, with the writer held out, for every reader of old frames to
finish. Under intake that wait is an intake stall, so (issue 19, T2, traced in capped soaks)
neither runs while a reader pins the WAL, and TRUNCATE never runs while commits go on:

* When the PASSIVE round could not even copy the frames the previous round saw (``copied <
  previous in_wal``), a reader has held an old snapshot for a whole interval (the agent's stats
  recount used to: a whole-table scan of 0.3-3 s at the size cap). A RESTART would hold the
  writer out while it waited for that reader and then give up; it is deferred to the next round
  (`deferrals`). The WAL grows meanwhile by what is committed while the reader reads: readers
  must stay short (the queue's recount reads in id ranges, one short read transaction each; a
  reader younger than a round ends within the RESTART's bounded wait).
* The size backstop is a RESTART, not a TRUNCATE: cutting the file while writers append meant
  a TRUNCATE that waited up to 5 s for readers with the writer held out (the soak's 338-441 ms
  stalls fell in windows where the queue's files shrank). The file's size stays bounded by the
  writer's ``journal_size_limit`` (SQLite cuts the WAL back to it at the first commit after a
  restart) and by this thread when idle.
* TRUNCATE runs when asked for (a full disk: intake is refused then, so it may wait) or when
  the WAL is idle (no frame added for `_IDLE_S`, all copied): it gives the file's blocks back
  once traffic stops, waiting at most `_RESTART_WAIT_MS`.

Used by the agent's queue and by the hub's store (this module is neutral: no queue or hub
imports).

Invariants: checkpoints never change what is committed, only where it lives, so a crash at any
point loses nothing; the thread holds no transaction between rounds; stop() is bounded; failures
are counted and logged at the 1st, 10th, 100th and every 1000th occurrence, never per round.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

__all__ = ["WAL_SIZE_LIMIT_BYTES", "WalCheckpointer"]

log = logging.getLogger("medagent.storage.checkpoint")

#: This process's open descriptors (Linux), to fsync files through SQLite's own descriptors.
_OWN_FDS = "/proc/self/fd"
#: The `journal_size_limit` every writer connection of a checkpointed database sets: the first
#: commit after the WAL started over cuts the file back to this size. Under intake the WAL file
#: is otherwise only cut by a TRUNCATE when idle (above), and that cut on the commit path costs
#: time in proportion to what it frees (measured: ~300 ms for a 300 MB WAL cut to 64 MB), so
#: this is a safety cap far above the steady state (the 16 MB RESTART threshold plus a round,
#: ~20-60 MB): it only acts after a long reader kept the WAL from restarting.
WAL_SIZE_LIMIT_BYTES = 256 * 1024 * 1024
#: Each WAL frame is a page plus this header (SQLite's file format).
_FRAME_HEADER_BYTES = 24
#: How long a RESTART checkpoint waits for the writer and for readers of old frames (it holds
#: the writer out meanwhile; if they are not done it gives up until the next round).
_RESTART_WAIT_MS = 20
#: How long a RESTART or TRUNCATE waits for this process's writer to finish its transaction
#: (`writer_gate`); past it the round gives up.
_GATE_WAIT_S = 1.0
#: How long a TRUNCATE asked for after a full disk waits for them (intake is refused meanwhile).
_TRUNCATE_WAIT_MS = 5000
#: No frame added for this long (at least two rounds) and the WAL counts as idle: a TRUNCATE may
#: then cut its file. Long against a descheduled writer's pause on a loaded box, short against
#: the end of a burst.
_IDLE_S = 1.0


class WalCheckpointer:
    def __init__(self, path: Path, *, interval_s: float = 0.5, restart_above_bytes: int = 16 * 1024 * 1024,
                 truncate_above_bytes: int = 64 * 1024 * 1024, writer_gate: threading.Lock | None = None) -> None:
        """`restart_above_bytes`: WAL content (frames since it last started over) past which a
        RESTART follows the PASSIVE round. An idle WAL file larger than the smaller of the two
        limits is cut to zero bytes (`truncate_above_bytes` no longer triggers a TRUNCATE under
        load: module docstring). `writer_gate`: the lock this process's writer holds around each
        write transaction (below; a new one when not given)."""
        self.path = Path(path)
        self.interval_s = interval_s
        self.restart_above_bytes = restart_above_bytes
        self.restarts = 0
        self.truncate_above_bytes = truncate_above_bytes
        self.checkpoints = 0
        self.truncations = 0
        self.errors = 0
        self.syncs = 0  # rounds that fsynced the WAL and database, lock-free, before a RESTART or TRUNCATE
        self.deferrals = 0  # rounds that skipped a due RESTART because a reader pinned old frames
        # This process's writer holds the gate around each write transaction, and a RESTART or
        # TRUNCATE takes it first, so the writer waits on a lock that wakes it the moment the
        # checkpoint ends, not in SQLite's busy handler, which sleeps in steps of 1, 2, 5, 10, 15,
        # 20, 25, 25, 25, 50, 50, 100 ms and checks the lock only after each (traced in a capped
        # soak: a 23 ms RESTART held the group commit behind it for 35 ms, a 43 ms one for 55 ms,
        # a 136 ms one for 130 ms, with 1 ms of CPU). The checkpoint then never waits for that
        # writer either; it waits only for readers of old frames.
        self.writer_gate = writer_gate if writer_gate is not None else threading.Lock()
        self._idle_s = max(2 * interval_s, _IDLE_S)  # no frame added for this long: the WAL is idle
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by stop() and request_truncate(): no waiting out the interval
        self._truncate_requested = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medagent-wal-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def request_truncate(self) -> None:
        """Run a TRUNCATE checkpoint in the next round (thread-safe, idempotent).

        Why: after a "disk full" the WAL may hold the space the writer needs; copying it back and
        cutting the file to zero bytes returns that space before intake resumes.
        """
        self._truncate_requested.set()
        self._wake.set()

    @property
    def truncate_pending(self) -> bool:
        """True from request_truncate() until a TRUNCATE checkpoint ran to the end."""
        return self._truncate_requested.is_set()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=_TRUNCATE_WAIT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            log.error("WAL checkpointer for %s cannot open the database: %s", self.path, exc)
            return
        try:
            frame_bytes = int(conn.execute("PRAGMA page_size").fetchone()[0]) + _FRAME_HEADER_BYTES
        except sqlite3.Error:
            frame_bytes = 4096 + _FRAME_HEADER_BYTES  # SQLite's default page
        try:
            previous = None  # the last PASSIVE round's frame count
            changed = time.monotonic()  # when a round last saw it change
            while True:
                self._wake.wait(self.interval_s)
                self._wake.clear()
                if self._stop.is_set():
                    break
                frames = self._checkpoint(conn, "PASSIVE")
                now = time.monotonic()
                if frames is None or frames[1] != previous:
                    changed = now
                self._after_passive(conn, frames, previous, frame_bytes, idle=now - changed >= self._idle_s)
                previous = None if frames is None else frames[1]
        finally:
            conn.close()

    def _after_passive(self, conn: sqlite3.Connection, frames: tuple[int, int, int] | None,
                       previous: int | None, frame_bytes: int, *, idle: bool) -> None:
        """Decide what follows a PASSIVE round (module docstring): a RESTART once the WAL holds
        more than `restart_above_bytes` and no old reader pins it, a TRUNCATE only when asked
        for or idle. ``frames`` is the PASSIVE's (busy, frames in the WAL, frames copied),
        ``previous`` the frames the round before saw (None: unknown, only PASSIVE this round),
        ``idle``: no frame was added for `_idle_s`."""
        requested = self._truncate_requested.is_set()
        if frames is None:  # the PASSIVE failed (busy, I/O): an asked-for TRUNCATE may still work
            if requested:
                self._truncate(conn, _TRUNCATE_WAIT_MS)
            return
        _busy, in_wal, copied = frames
        if requested:
            self._truncate(conn, _TRUNCATE_WAIT_MS)
            return
        if in_wal == 0 or previous is None:  # nothing written since a restart, or nothing to compare
            return
        if previous <= in_wal and copied < in_wal and copied <= previous:
            # A reader older than the previous round holds frames: a RESTART would hold the
            # writer out while it waited for it. (A younger one, e.g. a range of the recount,
            # ends within milliseconds: the RESTART's bounded wait covers it. in_wal < previous:
            # the WAL started over since, so no reader is older than that.) `copied ==
            # previous` counts too: a WAL that held only a pinned reader's frames at the
            # previous round (copied all of them then) and grew past the threshold since
            # leaves `copied` stuck there, and a RESTART then held the writer out ~20 ms.
            if in_wal * frame_bytes > self.restart_above_bytes:
                self.deferrals += 1
            return
        if idle and copied == in_wal:  # no commit for a while: give a large file's blocks back
            if self._wal_file_bytes() > min(self.restart_above_bytes, self.truncate_above_bytes):
                self._truncate(conn, _RESTART_WAIT_MS)
            return
        if in_wal * frame_bytes > self.restart_above_bytes:
            self._sync_files()
            if self._bounded(conn, "RESTART", _RESTART_WAIT_MS):
                self.restarts += 1

    def _truncate(self, conn: sqlite3.Connection, wait_ms: int) -> None:
        self._sync_files()
        if self._bounded(conn, "TRUNCATE", wait_ms):
            self._truncate_requested.clear()
            self.truncations += 1

    def _wal_file_bytes(self) -> int:
        try:
            return os.stat(f"{self.path}-wal").st_size
        except OSError:
            return 0

    def _sync_files(self) -> None:
        """fsync the WAL and the database file without holding any SQLite lock (module
        docstring: the RESTART or TRUNCATE that follows then holds the writer out only for what
        was written since), through the descriptors SQLite already holds in this process.
        Why not a descriptor of our own: closing any descriptor of a file drops every POSIX lock
        this process holds on it (SQLite's documented caveat; tried: another process then read
        the queue as "database disk image is malformed"). fsync changes no lock; a descriptor
        closed and reused meanwhile only means one harmless fsync of another file."""
        wanted = set()
        for path in (self.path, Path(f"{self.path}-wal")):
            try:
                wanted.add(path.resolve(strict=True))
            except OSError:
                pass
        try:
            descriptors = os.listdir(_OWN_FDS)
        except OSError:  # no /proc: the checkpoint's own syncs do all the work
            return
        for name in descriptors:
            try:
                target = Path(os.readlink(f"{_OWN_FDS}/{name}"))
                if target in wanted:  # each file once (the writer and this thread both hold one)
                    os.fsync(int(name))
                    wanted.discard(target)
            except (OSError, ValueError):
                continue  # closed meanwhile, or not a file: nothing to sync
        self.syncs += 1

    def _bounded(self, conn: sqlite3.Connection, mode: str, wait_ms: int) -> bool:
        """A RESTART or TRUNCATE checkpoint that waits at most `wait_ms` for the writer and for
        readers of old frames (it holds the writer out while it waits; if they are not done it
        gives up until a later round); True when it ran to the end."""
        if not self.writer_gate.acquire(timeout=_GATE_WAIT_S):
            return False  # a write job that long is stuck elsewhere: a later round
        try:
            conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
            try:
                frames = self._checkpoint(conn, mode)
                if mode == "RESTART" and frames is not None and not frames[0]:
                    self._start_wal_over(conn)  # (after a TRUNCATE the file is to stay empty)
            finally:
                conn.execute(f"PRAGMA busy_timeout = {_TRUNCATE_WAIT_MS}")
        except sqlite3.Error:  # setting the timeout failed: leave it to the next round
            return False
        finally:
            self.writer_gate.release()
        return frames is not None and not frames[0]

    def _start_wal_over(self, conn: sqlite3.Connection) -> None:
        """After a RESTART, while the gate still holds the writer out: be the first
        writer of the new WAL. That writer writes and syncs the WAL's new header (an fdatasync:
        66-103 ms on a busy disk, traced in capped soaks as the first intake commit after every
        restart); here it is paid in this thread (the queue journals meanwhile). The write
        rewrites the database's user_version with its own value: it changes nothing."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                conn.execute(f"PRAGMA user_version = {version}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:  # another process writes: then it starts the WAL over
            self._failed("starting the WAL over", exc)

    def _checkpoint(self, conn: sqlite3.Connection, mode: str) -> tuple[int, int, int] | None:
        """One checkpoint: SQLite's (busy, frames in the WAL, frames copied), or None on failure.
        ``busy`` is 0 when it ran to the end."""
        try:
            busy, in_wal, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except sqlite3.Error as exc:  # busy, I/O, disk full: try again next round
            self._failed("WAL checkpoint", exc)
            return None
        self.checkpoints += 1
        return int(busy), int(in_wal), int(copied)

    def _failed(self, what: str, exc: sqlite3.Error) -> None:
        """Count a failure; log the 1st, 10th, 100th and every 1000th (module docstring)."""
        self.errors += 1
        if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
            log.warning("%s of %s failed (%d so far): %s", what, self.path, self.errors, exc)
