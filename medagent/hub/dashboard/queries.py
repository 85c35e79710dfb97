"""Read-only queries of the hub's database for the dashboard, on a reader thread of its own.

Theory of operation
-------------------
The dashboard reads the hub store through its own connection (SQLite: WAL, readers never block
the hub's writer and the writer never blocks a reader; PostgreSQL: a read-only session; see
readconn.py), opened on one dedicated thread
(:class:`HubReader`), so a slow search never stalls the hub's event loop and never competes
with the hub's writer thread for a connection.

Indexes: the hub's schema has ``messages_agent (agent_id, id)`` and ``messages_control_id``;
the dashboard adds one at start (idempotently, ``CREATE INDEX IF NOT EXISTS``):
``dashboard_messages_failed (agent_id, id) WHERE status = 'error'`` — a *partial* index: it
holds only failed messages, so counting and listing failures is cheap and a message that
succeeds costs the hub's insert path nothing extra for it.

No index on ``received_at``: it would be one more B-tree written for every stored message. A
time bound (the last 5 minutes of bot latencies, a search's since/until, the start-up count of
the last hour) becomes an id bound first (idbound.py: a bisection over the primary key, ids grow
with time), and the query ranges over ``id`` with its ``received_at`` condition kept, so the
rows it selects are the same. Schema v5 drops the time index earlier dashboards created.

Counts of the last minute and hour (overview, live ticks, per-channel charts) come from
:class:`~medagent.hub.dashboard.window.RecentWindow`, which reads each new row once instead of
re-counting the hour on every request.

Message search is keyset-paginated newest first (``id < before``), at most ``PAGE`` rows.
Nothing here writes to the hub's tables.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from medagent.hub.dashboard.idbound import id_ceiling, id_floor
from medagent.hub.dashboard.readconn import ReadConnection, open_read_connection
from medagent.hub.dashboard.window import RecentWindow
from medagent.hub.records import MessageStatus
from medagent.hub.store.common import add_filters

__all__ = ["INDEXES", "PAGE", "AgentCounts", "ChannelMinute", "DicomSeries", "HubReader", "MessageFilter", "MessageRow"]

log = logging.getLogger(__name__)

PAGE = 50
INDEXES = (
    "CREATE INDEX IF NOT EXISTS dashboard_messages_failed ON messages (agent_id, id) WHERE status = 'error'",
)
#: bot latencies of a channel page: the newest rows of this long (at most LATENCY_ROWS of them)
LATENCY_WINDOW_MS = 300_000
LATENCY_ROWS = 20_000

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MessageFilter:
    agent_id: str | None = None
    channel: str | None = None
    message_type: str | None = None
    control_id: str | None = None
    status: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    before_id: int | None = None


@dataclass(frozen=True, slots=True)
class MessageRow:
    """A message without its body (the list and the header of the detail view)."""

    id: int
    agent_id: str
    channel: str
    remote: str
    callback: str
    control_id: str | None
    message_type: str | None
    content_type: str
    body_size: int
    received_at: int
    status: str
    reply_status: int | None
    reply_content_type: str | None
    error: str | None
    duplicate: int
    processed_at: int | None

    @property
    def latency_ms(self) -> int | None:
        return None if self.processed_at is None else self.processed_at - self.received_at


@dataclass(frozen=True, slots=True)
class AgentCounts:
    """``None``: not known yet (the start-up count of the last hour is still running)."""

    last_minute: int | None = 0
    last_hour: int | None = 0
    failed: int = 0


@dataclass(slots=True)
class ChannelMinute:
    """Per-minute figures of one channel over the last hour (index 0 = 59 minutes ago)."""

    counts: list[int] = field(default_factory=lambda: [0] * 60)
    errors: int = 0
    latencies_ms: list[int] = field(default_factory=list)


_ROW_COLUMNS = (
    "id, agent_id, channel, remote, callback, control_id, message_type, content_type, length(body), received_at,"
    " status, reply_status, reply_content_type, error, duplicate, processed_at"
)


@dataclass(frozen=True, slots=True)
class DicomSeries:
    """One stored DICOM series (no patient name or id: those are PHI)."""

    study_uid: str
    series_uid: str
    modality: str
    study_date: str
    instances: int
    size: int
    last_stored: float


class HubReader:
    """One thread with one read connection to the hub's database (and one to the DICOM index)."""

    def __init__(self, store: Path | str, dicom_path: Path | None = None) -> None:
        """``store``: the hub.sqlite3 path, or the PostgreSQL URL of the hub store."""
        self._store = store
        self._dicom_path = dicom_path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medagent-dashboard-reader")
        self._conn: ReadConnection | None = None
        self._dicom: sqlite3.Connection | None = None
        #: last-hour counts, used on the reader thread only; ``None`` until the start-up count is done
        self.window: RecentWindow | None = None
        self._bootstrap: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Open (creating the indexes: before the hub listens, as building one on a big table holds
        the database's write lock), then count the last hour on a thread and connection of its own
        (read-only, a few seconds on a very busy store); until it is done, pages show the counts
        of the last hour as unknown instead of waiting."""
        await self.run(self._open)
        self._bootstrap = asyncio.ensure_future(asyncio.to_thread(self._bootstrap_window))

    def _open(self) -> None:
        self._conn = open_read_connection(self._store, INDEXES)

    def _bootstrap_window(self) -> None:
        window = RecentWindow()
        conn = open_read_connection(self._store)
        try:
            window.bootstrap(conn, _now_ms())
        except Exception:  # the live counts then start from now; searches are unaffected
            log.exception("counting the last hour of messages failed")
            window = RecentWindow()
            window.last_id = conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
        finally:
            conn.close()
        self.window = window  # one assignment: the reader thread sees no window or a whole one

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        if self._bootstrap is not None:
            await self._bootstrap
        for conn in (self._conn, self._dicom):
            if conn is not None:
                await self.run(conn.close)
        self._conn = self._dicom = None
        self._executor.shutdown(wait=True)

    @property
    def conn(self) -> ReadConnection:
        if self._conn is None:
            raise RuntimeError("the dashboard reader is not started")
        return self._conn

    # -- queries (run them with ``await reader.run(reader.<name>, ...)``) ------------------

    def agent_counts(self, agent_ids: list[str], now_ms: int | None = None) -> dict[str, AgentCounts]:
        now_ms = now_ms if now_ms is not None else _now_ms()
        conn = self.conn
        failed = dict(conn.execute(  # the partial index: SQLite would rather walk messages_agent (every row)
            "SELECT agent_id, count(*) FROM messages INDEXED BY dashboard_messages_failed"
            " WHERE status = 'error' GROUP BY agent_id"))
        window = self.window
        if window is None:  # still counting the last hour at start-up
            return {a: AgentCounts(None, None, failed.get(a, 0)) for a in agent_ids}
        window.refresh(conn, now_ms)
        minute = window.last_minute(now_ms)
        return {a: AgentCounts(minute.get(a, 0), window.hour_total.get(a, 0), failed.get(a, 0)) for a in agent_ids}

    def stored_total(self) -> int:
        """Messages stored (the largest id: rows are never deleted by this hub version)."""
        return int(self.conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0])

    def channel_minutes(self, agent_id: str, now_ms: int | None = None) -> dict[str, ChannelMinute]:
        """Per channel: messages per minute over the last hour, errors, and bot latencies of the last minutes."""
        now_ms = now_ms if now_ms is not None else _now_ms()
        window = self.window
        channels: dict[str, ChannelMinute] = {}
        if window is not None:
            window.refresh(self.conn, now_ms)
            channels = {name: ChannelMinute(counts) for name, counts in window.per_minute(agent_id, now_ms).items()}
        for channel, errors in self.conn.execute(  # the partial index of failures: reads failed rows only
            "SELECT channel, count(*) FROM messages INDEXED BY dashboard_messages_failed"
            " WHERE agent_id = ? AND status = 'error' AND received_at >= ?"
            " GROUP BY channel",
            (agent_id, now_ms - 3_600_000),
        ):
            channels.setdefault(channel, ChannelMinute()).errors = errors
        # Latency percentiles from the last 5 minutes, at most LATENCY_ROWS rows, the newest
        # (by id: the order they were stored in) first; messages_agent read backwards from the top.
        since = now_ms - LATENCY_WINDOW_MS
        for channel, received, processed in self.conn.execute(
            "SELECT channel, received_at, processed_at FROM messages WHERE agent_id = ? AND id >= ?"
            " AND received_at >= ? AND processed_at IS NOT NULL ORDER BY id DESC LIMIT ?",
            (agent_id, id_floor(self.conn, since), since, LATENCY_ROWS),
        ):
            channels.setdefault(channel, ChannelMinute()).latencies_ms.append(processed - received)
        return channels

    def search(self, f: MessageFilter, limit: int = PAGE) -> tuple[list[MessageRow], int | None]:
        """A page of messages newest first, and the ``before`` id of the next page (or ``None``)."""
        where: list[str] = ["id < ?"]
        params: list[Any] = [f.before_id if f.before_id is not None else 2**62]
        # A time filter also bounds the ids read (same rows: the received_at conditions stay).
        if f.until_ms is not None:
            params[0] = min(params[0], id_ceiling(self.conn, f.until_ms))
        if f.since_ms is not None:
            where.append("id >= ?")
            params.append(id_floor(self.conn, f.since_ms))
        add_filters(where, params, agent_id=f.agent_id, channel=f.channel, control_id=f.control_id,
                    message_type=f.message_type, since=f.since_ms, until=f.until_ms)
        if f.status is not None:
            # A literal, not a parameter: only then can SQLite use the partial index of failures.
            where.append(f"status = '{MessageStatus(f.status).value}'")
        rows = self.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM messages WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        page = [MessageRow(*r) for r in rows[:limit]]
        return page, (page[-1].id if len(rows) > limit else None)

    def message(self, message_id: int) -> MessageRow | None:
        row = self.conn.execute(f"SELECT {_ROW_COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
        return None if row is None else MessageRow(*row)

    def message_texts(self, message_id: int) -> tuple[str, str | None] | None:
        """``(body, reply_body)`` of a message (PHI: callers audit the access)."""
        row = self.conn.execute("SELECT body, reply_body FROM messages WHERE id = ?", (message_id,)).fetchone()
        return None if row is None else (row[0], row[1])


    def dicom_series(self, limit: int = 200) -> list[DicomSeries] | None:
        """The most recently stored series (``None`` when this hub has no DICOM index)."""
        if self._dicom is None:
            if self._dicom_path is None or not self._dicom_path.exists():
                return None
            self._dicom = sqlite3.connect(f"file:{self._dicom_path}?mode=ro", uri=True, check_same_thread=False)
            self._dicom.execute("PRAGMA busy_timeout=5000")
        rows = self._dicom.execute(
            "SELECT study_uid, series_uid, max(modality), max(study_date), count(*), sum(size), max(stored_at)"
            " FROM instances GROUP BY study_uid, series_uid ORDER BY 7 DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [DicomSeries(*r) for r in rows]


def _now_ms() -> int:
    return int(time.time() * 1000)


def percentile(values: list[int], fraction: float) -> int | None:
    """Nearest-rank percentile (``fraction`` in 0..1) of ``values``, or ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(fraction * len(ordered) + 0.999999)))
    return ordered[rank - 1]
