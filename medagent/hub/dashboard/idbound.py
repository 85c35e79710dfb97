"""A time bound on ``messages.received_at`` turned into an id bound, without an index on time.

Why: an index on ``received_at`` (the dashboard had ``(agent_id, received_at, channel)``) is one
more B-tree written for every stored message, forever, to serve a few reads of the last minutes
or hour. Ids grow with time instead: the hub stamps ``received_at`` when it takes a group in and
stores the group right after, so a larger id was received at (nearly) the same time or later. A
binary search over the primary key finds where a time begins in about 2·log2(rows) short seeks,
and the dashboard's queries then range over ``id`` (the primary key, or ``messages_agent
(agent_id, id)``) and keep their ``received_at`` condition, so what they count is unchanged.

Semantics (exact under a bounded disorder): ids and times may disagree by up to
:data:`DISORDER_MS` (a row with a smaller id received at most that much *later* than one with a
larger id: several groups in flight, hub processes of one PostgreSQL store whose clocks differ a
little). Under that bound :func:`id_floor` never excludes a row at or after the time, and
:func:`id_ceiling` never excludes a row before it; the callers' ``received_at`` conditions remove
the extra rows the margin lets in (a minute more of rows read per bounded query: the price of
the margin). A wall clock stepped back by more than the bound can hide from a time-bounded read
(start-up count, search, latencies) rows stamped just *before* the step; rows stored after the
dashboard started are counted by id (window.py) and are unaffected.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medagent.hub.dashboard.readconn import ReadConnection

__all__ = ["DISORDER_MS", "id_ceiling", "id_floor"]

#: how much later than a larger-id row a smaller-id row may have been received
DISORDER_MS = 60_000

_FIRST_AT_OR_AFTER = "SELECT received_at FROM messages WHERE id >= ? ORDER BY id LIMIT 1"
#: two subqueries: SQLite reads min() or max() off the key only when it is the query's one aggregate
_ID_RANGE = "SELECT (SELECT min(id) FROM messages), (SELECT max(id) FROM messages)"


def id_floor(conn: ReadConnection | sqlite3.Connection, since_ms: int) -> int:
    """An id such that every row with a smaller id was received before ``since_ms``."""
    return _first_id_reaching(conn, since_ms - DISORDER_MS)


def id_ceiling(conn: ReadConnection | sqlite3.Connection, until_ms: int) -> int:
    """An id such that every row with this id or a larger one was received at or after ``until_ms``."""
    return _first_id_reaching(conn, until_ms + DISORDER_MS)


def _first_id_reaching(conn: ReadConnection | sqlite3.Connection, at_ms: int) -> int:
    """The smallest ``x`` (within min(id)..max(id)+1) where the first row with id >= ``x`` was
    received at or after ``at_ms``, by bisection over the id range (gaps left by retention are
    fine: a probe reads the first row at or after it).

    What the bisection guarantees even when times are not sorted by id: either ``x`` is the
    smallest id, or the row ``x - 1`` exists and was received before ``at_ms`` (had it not
    existed, probing ``x - 1`` would have read the same row as probing ``x``). With the disorder
    bounded by DISORDER_MS, every row up to ``x - 1`` was then received before
    ``at_ms + DISORDER_MS``; and every row from ``x`` on at or after ``at_ms - DISORDER_MS``.
    """
    low, high = conn.execute(_ID_RANGE).fetchone()
    if low is None:
        return 1
    high += 1  # the predicate holds past the last row
    while low < high:
        mid = (low + high) // 2
        if conn.execute(_FIRST_AT_OR_AFTER, (mid,)).fetchone()[0] >= at_ms:
            high = mid
        else:
            low = mid + 1
    return low
