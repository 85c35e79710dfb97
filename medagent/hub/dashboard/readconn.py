"""The dashboard reader's read-only connection to the hub store, on either engine.

Why here and not through HubStore: the dashboard's search and live counts are its own queries
(indexes of their own, a window of recent rows, see queries.py and window.py) run on a reader
thread of its own, so they never queue behind the hub's store calls. They are plain SQL that
both engines run; this module opens the right connection and hides the two differences:

* SQLite: a connection to ``hub.sqlite3`` (WAL: readers never block the writer), made
  read-only with ``PRAGMA query_only`` once the dashboard's indexes exist;
* PostgreSQL: a synchronous psycopg connection (this runs on the reader thread, never on the
  event loop) in a read-only session; statements written with ``?`` placeholders get ``%s``,
  and SQLite's ``INDEXED BY <index>`` hint is dropped (PostgreSQL's planner picks the index).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ReadConnection", "open_read_connection"]

_INDEXED_BY = re.compile(r"\s+INDEXED BY \w+")


class ReadConnection:
    """``execute(sql, params)`` returning an iterable cursor (``fetchone``/``fetchall``), ``close()``."""

    def __init__(self, conn: Any, postgres: bool) -> None:
        self._conn = conn
        self._postgres = postgres

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if self._postgres:
            sql = _INDEXED_BY.sub("", sql).replace("%", "%%").replace("?", "%s")
        return self._conn.execute(sql, params)

    def close(self) -> None:
        self._conn.close()


def open_read_connection(target: Path | str, indexes: Sequence[str] = ()) -> ReadConnection:
    """Open ``target`` (the hub.sqlite3 path, or a PostgreSQL URL), create ``indexes`` if
    missing, then make the connection read-only."""
    if isinstance(target, str) and target.startswith(("postgresql://", "postgres://")):
        import psycopg

        conn = psycopg.connect(target, autocommit=True, connect_timeout=10)
        for statement in indexes:
            try:
                conn.execute(statement)
            except psycopg.errors.UniqueViolation:
                pass  # another hub process created it at the same moment
        conn.execute("SET default_transaction_read_only = on")
        return ReadConnection(conn, postgres=True)
    sqlite = sqlite3.connect(Path(target), isolation_level=None, check_same_thread=False)
    sqlite.execute("PRAGMA busy_timeout=5000")
    for statement in indexes:
        sqlite.execute(statement)
    sqlite.execute("PRAGMA query_only=ON")  # from here on this connection cannot write
    return ReadConnection(sqlite, postgres=False)
