"""Schema v5 (no index on time per stored message): the migration drops the dashboard's old
``dashboard_messages_agent_time`` on each engine and keeps every row, and every query the
dashboard runs on ``messages`` is still served by a key or an index (EXPLAIN evidence, from the
statements the dashboard really executes, traced)."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

from engines.postgres import PostgresServer

from medagent.hub.dashboard.idbound import DISORDER_MS, id_floor
from medagent.hub.dashboard.queries import HubReader, MessageFilter
from medagent.hub.dashboard.window import WINDOW_MS, RecentWindow
from medagent.hub.schema import SCHEMA_VERSION, migrate
from medagent.hub.store import DB_FILE
from medagent.hub.store.common import INSERT_MESSAGE, TABLE_COLUMNS, insert_params
from medagent.hub.store.postgres import PostgresHubStore
from medagent.hub.store.sqlite import SqliteCore

OLD_INDEX = "CREATE INDEX dashboard_messages_agent_time ON messages (agent_id, received_at, channel)"
HUB_INDEXES = {"messages_agent", "messages_control_id", "messages_retention"}
NOW = 1_800_000_000_000
ROWS = 400


def rows_of(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(f"SELECT {', '.join(TABLE_COLUMNS['messages'])} FROM messages ORDER BY id").fetchall()


def sqlite_indexes(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'"
                                       " AND tbl_name = 'messages' AND sql IS NOT NULL")}


def test_sqlite_v4_to_v5_drops_the_dashboard_time_index(tmp_path: Path) -> None:
    from test_hub_store_schema_v4 import incoming, result

    conn = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
    migrate(conn, 4)
    conn.execute(OLD_INDEX)  # as a dashboard before v5 created it
    conn.executemany(INSERT_MESSAGE, [insert_params(incoming(i), 0, None, result(i) if i % 4 else None)
                                      for i in range(60)])
    before = rows_of(conn)
    conn.close()
    SqliteCore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / DB_FILE)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert sqlite_indexes(conn) == HUB_INDEXES
        assert rows_of(conn) == before and conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def plan_of(conn: sqlite3.Connection, sql: str) -> list[str]:
    return [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql)]


#: how a plan step may read messages: a seek, or a walk of the partial index of failed rows only
_ALLOWED = re.compile(r"^(SEARCH messages( USING .+)?|SCAN messages USING (COVERING )?INDEX dashboard_messages_failed)$")


async def test_sqlite_every_dashboard_query_seeks_a_key_or_an_index(tmp_path: Path) -> None:
    core = SqliteCore(tmp_path)
    agent = core.add_agent("a").agent_id
    core.close()
    conn = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO messages (agent_id, channel, remote, callback, content_type, body, received_at,"
                     " status, processed_at, control_id, message_type) VALUES (?, ?, 'r', ?, 'text/plain', 'x', ?,"
                     " ?, ?, ?, 'ADT^A01')",
                     [(agent, ("adt", "lab")[i % 2], f"cb{i}", NOW - (ROWS - i) * 10_000,
                       "error" if i % 9 == 0 else "processed", NOW, f"C{i}") for i in range(ROWS)])
    conn.execute("COMMIT")
    executed: list[str] = []
    conn.set_trace_callback(executed.append)
    window = RecentWindow()
    window.bootstrap(conn, NOW)  # the start-up count runs on a connection of its own
    window.refresh(conn, NOW)
    reader = HubReader(tmp_path / DB_FILE)
    await reader.run(reader._open)
    reader.window = RecentWindow()
    reader.conn._conn.set_trace_callback(executed.append)
    try:
        await reader.run(reader.agent_counts, [agent], NOW)
        await reader.run(reader.stored_total)
        minutes = await reader.run(reader.channel_minutes, agent, NOW)
        assert len(minutes["adt"].latencies_ms) + len(minutes["lab"].latencies_ms) == 30  # the last 5 minutes
        for f in (MessageFilter(), MessageFilter(agent_id=agent), MessageFilter(agent_id=agent, channel="adt"),
                  MessageFilter(control_id="C7"), MessageFilter(message_type="ADT"), MessageFilter(status="error"),
                  MessageFilter(agent_id=agent, status="error"), MessageFilter(since_ms=NOW - 60_000),
                  MessageFilter(agent_id=agent, since_ms=NOW - WINDOW_MS, until_ms=NOW - 600_000),
                  MessageFilter(until_ms=NOW - 3_000_000, before_id=100)):
            await reader.run(reader.search, f)
        await reader.run(reader.message, 5)
        await reader.run(reader.message_texts, 5)
    finally:
        reader.conn._conn.set_trace_callback(None)
        await reader.close()
    conn.set_trace_callback(None)
    queries = {q for q in executed if " messages" in q and q.lstrip().upper().startswith("SELECT")}
    assert len(queries) >= 15
    for sql in queries:
        steps = [s for s in plan_of(conn, sql) if "messages" in s]
        assert steps and all(_ALLOWED.match(s) for s in steps), (sql, steps)
    by_text = {sql.split(" FROM ")[0]: plan_of(conn, sql) for sql in queries}
    assert "SEARCH messages USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in by_text[
        "SELECT agent_id, channel, received_at - received_at % 10000, count(*)"]  # start-up: the hour's ids only
    assert "SEARCH messages USING INDEX messages_agent (agent_id=? AND id>?)" in by_text[
        "SELECT channel, received_at, processed_at"]  # latencies: one agent's newest ids, read backwards
    conn.close()


async def test_postgres_v4_to_v5_drops_the_index_and_the_bounds_seek_the_key(
        postgres_server: PostgresServer, postgres_url: str) -> None:
    from test_hub_store_schema_v4 import incoming, pg_plan

    database = postgres_url.rsplit("/", 1)[1]
    old = await PostgresHubStore.open(postgres_url, migrate_to=4)
    try:
        await old.write_round([[incoming(i) for i in range(60)]], ())
    finally:
        await old.close()
    postgres_server.sql(OLD_INDEX, database)
    columns = ", ".join(TABLE_COLUMNS["messages"])
    before = postgres_server.sql(f"SELECT {columns} FROM messages ORDER BY id", database)
    store = await PostgresHubStore.open(postgres_url)
    try:
        assert postgres_server.sql("SELECT version FROM medagent_schema_version", database) == [(SCHEMA_VERSION,)]
        indexes = {r[0] for r in postgres_server.sql(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'messages'", database)}
        assert indexes == HUB_INDEXES | {"messages_pkey", "messages_callback_key"}
        assert postgres_server.sql(f"SELECT {columns} FROM messages ORDER BY id", database) == before
        for sql, params, index in (
            ("SELECT received_at FROM messages WHERE id >= ? ORDER BY id LIMIT 1", (5,), ("messages_pkey",)),
            (("SELECT agent_id, channel, received_at - received_at %% 10000, count(*) FROM messages WHERE id >= ?"
             " AND id <= ? AND received_at >= ? AND received_at <= ? GROUP BY 1, 2, 3"), (5, 50, 0, 2_000),
             ("messages_pkey",)),
            (("SELECT channel, received_at, processed_at FROM messages WHERE agent_id = ? AND id >= ?"
             " AND received_at >= ? AND processed_at IS NOT NULL ORDER BY id DESC LIMIT ?"), ("agent-0", 5, 0, 10),
             ("messages_agent", "messages_pkey")),  # the planner's pick on a table this small
        ):
            text = pg_plan(postgres_url, sql, params)
            assert any(i in text for i in index) and "Seq Scan" not in text, text
        import psycopg

        with psycopg.connect(postgres_url, autocommit=True) as conn:  # the bisection on PostgreSQL
            from medagent.hub.dashboard.readconn import ReadConnection

            floor = id_floor(ReadConnection(conn, postgres=True), 1_030 + DISORDER_MS)
            assert [r[0] for r in conn.execute("SELECT received_at FROM messages WHERE id = %s", (floor - 1,))] == [1_029]
    finally:
        await store.close()
