"""Message counts of the last hour per (agent, channel), kept up to date incrementally.

Theory of operation
-------------------
Counting a busy hub's last hour with SQL reads every row of that hour (a million rows at
280 msg/s), on every page load and every live tick. Instead, :class:`RecentWindow` reads each
stored row once: :meth:`RecentWindow.refresh` takes only the rows with an id above the last one
seen (a primary-key range scan, cost proportional to what arrived since the last refresh) and
adds them to 10-second buckets per (agent, channel); buckets older than an hour are dropped and
their counts subtracted from the running per-agent totals. So the last-hour total of an agent
is a dictionary lookup, the last minute six buckets, and a channel's per-minute chart sixty sums.

Start-up (:meth:`RecentWindow.bootstrap`) lets the database count the last hour per (agent,
channel, bucket) over a primary-key range (the hour's first id found by bisection, idbound.py:
no index on time is written per message for this), once; from then on only new rows are read.

Invariants: every row is counted at most once (``last_id`` only grows); a row counts only while
its ``received_at`` is within the last hour; ``hour_total[agent]`` always equals the sum of the
agent's live buckets. Pure apart from the connection handed to refresh/bootstrap.
"""

from __future__ import annotations

import collections
import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING

from medagent.hub.dashboard.idbound import id_floor

if TYPE_CHECKING:
    from medagent.hub.dashboard.readconn import ReadConnection

__all__ = ["BUCKET_MS", "WINDOW_MS", "RecentWindow"]

BUCKET_MS = 10_000
WINDOW_MS = 3_600_000
_REFRESH_CHUNK = 100_000

#: one bucket: agent_id -> channel -> count
Bucket = dict[str, dict[str, int]]


class RecentWindow:
    def __init__(self) -> None:
        self.last_id = 0
        #: bucket start (ms) -> counts, oldest first
        self._buckets: collections.OrderedDict[int, Bucket] = collections.OrderedDict()
        self.hour_total: collections.Counter[str] = collections.Counter()

    # -- feeding ----------------------------------------------------------------------------

    def add(self, rows: Iterable[tuple[int, str, str, int]], now_ms: int) -> None:
        """Count rows ``(id, agent_id, channel, received_at)`` given in ascending id order."""
        oldest = now_ms - WINDOW_MS
        for row_id, agent_id, channel, received_at in rows:
            self.last_id = max(self.last_id, row_id)
            if received_at < oldest or received_at > now_ms + WINDOW_MS:
                continue  # outside the window (or a wildly wrong clock): never counted
            start = received_at - received_at % BUCKET_MS
            bucket = self._buckets.get(start)
            if bucket is None:
                # Rows come in id order, and ids grow with time, so a new bucket is almost always
                # the newest; a late one (clock step, slow writer) puts the order right again.
                late = bool(self._buckets) and start < next(reversed(self._buckets))
                bucket = self._buckets[start] = {}
                if late:
                    self._buckets = collections.OrderedDict(sorted(self._buckets.items()))
            channels = bucket.get(agent_id)
            if channels is None:
                channels = bucket[agent_id] = {}
            channels[channel] = channels.get(channel, 0) + 1
            self.hour_total[agent_id] += 1
        self.expire(now_ms)

    def expire(self, now_ms: int) -> None:
        oldest = now_ms - WINDOW_MS
        while self._buckets:
            start = next(iter(self._buckets))
            if start + BUCKET_MS > oldest:
                break
            for agent_id, channels in self._buckets.pop(start).items():
                self.hour_total[agent_id] -= sum(channels.values())
                if self.hour_total[agent_id] <= 0:
                    del self.hour_total[agent_id]

    def refresh(self, conn: ReadConnection | sqlite3.Connection, now_ms: int) -> None:
        """Count the rows stored since the last refresh."""
        for _ in range(10_000):  # bounded: 10,000 chunks of 100,000 rows
            rows = conn.execute(
                "SELECT id, agent_id, channel, received_at FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                (self.last_id, _REFRESH_CHUNK),
            ).fetchall()
            self.add(rows, now_ms)
            if len(rows) < _REFRESH_CHUNK:
                break

    def bootstrap(self, conn: ReadConnection | sqlite3.Connection, now_ms: int) -> None:
        """Count the last hour once, aggregated by the database (the rows never reach Python one by one).

        The newest id is read first (rows stored meanwhile are left to :meth:`refresh`); then the
        rows of the hour up to that id are counted per (agent, channel, bucket) in one range scan
        of the primary key from the hour's first id (:func:`id_floor`). The ``received_at``
        conditions are the ones :meth:`add` applies, so the counts are what reading every row
        would give.
        """
        newest = conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
        oldest = now_ms - WINDOW_MS
        for agent_id, channel, start, count in conn.execute(
            "SELECT agent_id, channel, received_at - received_at % ?, count(*) FROM messages"
            " WHERE id >= ? AND id <= ? AND received_at >= ? AND received_at <= ? GROUP BY 1, 2, 3",
            (BUCKET_MS, id_floor(conn, oldest), newest, oldest, now_ms + WINDOW_MS),
        ):
            bucket = self._buckets.setdefault(start, {})
            channels = bucket.setdefault(agent_id, {})
            channels[channel] = channels.get(channel, 0) + count
            self.hour_total[agent_id] += count
        self._buckets = collections.OrderedDict(sorted(self._buckets.items()))
        self.last_id = max(self.last_id, newest)
        self.expire(now_ms)

    # -- reading ----------------------------------------------------------------------------

    def last_minute(self, now_ms: int) -> collections.Counter[str]:
        """Per agent: rows received in the last 60 s (to the bucket: 60-70 s)."""
        since = now_ms - 60_000
        counts: collections.Counter[str] = collections.Counter()
        for start, bucket in reversed(self._buckets.items()):
            if start + BUCKET_MS <= since:
                break
            for agent_id, channels in bucket.items():
                counts[agent_id] += sum(channels.values())
        return counts

    def per_minute(self, agent_id: str, now_ms: int) -> dict[str, list[int]]:
        """Per channel of ``agent_id``: 60 counts, one per minute, the last one ending now."""
        out: dict[str, list[int]] = {}
        for start, bucket in self._buckets.items():
            channels = bucket.get(agent_id)
            if not channels:
                continue
            minute = 59 - (now_ms - start - 1) // 60_000 if start < now_ms else 59
            if not 0 <= minute <= 59:
                continue
            for channel, count in channels.items():
                out.setdefault(channel, [0] * 60)[minute] += count
        return out
