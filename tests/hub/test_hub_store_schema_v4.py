"""Schema v4 (one retention index instead of two): the forward migration from a populated v3
database on each engine keeps every row as it was, and each query the hub runs on messages is
still served by an index (EXPLAIN evidence), retention steps reading only the rows they change."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from engines.postgres import PostgresServer

from medagent.hub.records import IncomingMessage, MessageResult, MessageStatus, StoredReply
from medagent.hub.schema import SCHEMA_VERSION, SQLITE_TYPES, migrate, statements
from medagent.hub.store import DB_FILE
from medagent.hub.store.common import (
    DELETE_EXPIRED,
    INSERT_MESSAGE,
    MESSAGE_CHANNELS,
    PURGE_BODIES,
    TABLE_COLUMNS,
    delete_params,
    insert_params,
    purge_params,
)
from medagent.hub.store.postgres import PostgresHubStore
from medagent.hub.store.sqlite import SqliteCore

ROWS = 60
REPLY = StoredReply("MSH|^~\\&|ACK", "x-application/hl7-v2+er7", 200)
V4_INDEXES = {"messages_agent", "messages_control_id", "messages_retention"}


def incoming(i: int) -> IncomingMessage:
    return IncomingMessage(agent_id=f"agent-{i % 2}", channel=("adt", "lab")[i % 3 == 0], remote="10.0.0.1:1",
                           callback=f"cb-{i}", content_type="x-application/hl7-v2+er7",
                           body=f"MSH|^~\\&|A|B|||||ADT^A01|C{i}\rPID|1||{i}", received_at=1_000 + i,
                           control_id=f"C{i}", message_type="ADT^A01",
                           duplicate_of="cb-3" if i == 40 else None)


def result(i: int) -> MessageResult:
    return MessageResult(f"cb-{i}", MessageStatus.PROCESSED, REPLY, None, 5_000 + i)


def sqlite_rows(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT {', '.join(TABLE_COLUMNS['messages'])} FROM messages ORDER BY id").fetchall()
    finally:
        conn.close()


def populate_v3_sqlite(path: Path) -> None:
    """Rows (answered and not), a resend counted twice, a duplicate by duplicate_of, purged bodies
    (with the v3 schema's own indexes), written as the v3 hub wrote them."""
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, 3)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    conn.executemany(INSERT_MESSAGE, [insert_params(incoming(i), int(i == 40), incoming(i).duplicate_of,
                                                    result(i) if i % 4 else None) for i in range(ROWS)])
    conn.execute("UPDATE messages SET duplicate = duplicate + 2 WHERE callback = 'cb-9'")
    conn.execute("UPDATE messages SET body = '', reply_body = NULL, body_purged_at = 9 WHERE id IN"
                 " (SELECT id FROM messages INDEXED BY messages_channel_body_age WHERE channel = 'adt'"
                 " AND received_at < 1020 AND body_purged_at IS NULL)")
    conn.close()


def test_sqlite_v3_to_v4_keeps_every_row_and_serves_retention(tmp_path: Path) -> None:
    populate_v3_sqlite(tmp_path / DB_FILE)
    before = sqlite_rows(tmp_path / DB_FILE)
    assert sum(1 for r in before if r[-1] is not None) == 13 and len(before) == ROWS  # purged rows: adt, < 1020
    core = SqliteCore(tmp_path)
    try:
        assert sqlite_rows(core.path) == before
        conn = sqlite3.connect(core.path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION  # v4, then v5 (no index change here)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'"
                                              " AND tbl_name = 'messages' AND sql IS NOT NULL")}
        assert indexes == V4_INDEXES
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert core.message_channels() == ["adt", "lab"]
        # purge: only the adt rows < 1030 not purged yet (1020..1029 less the lab ones)
        assert core.purge_bodies("adt", 1_030, 100) == 7
        assert core.purge_bodies("adt", 1_030, 100) == 0
        # delete: the purged half first (20 adt rows < 1030), then the unpurged (6 in 1030..1039), 8 a step
        deleted = [core.delete_messages("adt", 1_040, 8) for _ in range(5)]
        assert deleted == [8, 8, 8, 2, 0]
        after = {r[4]: r for r in sqlite_rows(core.path)}
        assert len(after) == ROWS - 26 and all(r[2] == "lab" or r[9] >= 1_040 for r in after.values())
        assert after["cb-9"][15] == 2 and after["cb-40"][16] == "cb-3" and after["cb-41"][11] == REPLY.body
        conn.close()
    finally:
        core.close()


def plan(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> str:
    return " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


@pytest.mark.parametrize(("sql", "params", "index"), [
    (PURGE_BODIES, purge_params("adt", 5, 10), "INDEX messages_retention (channel=? AND <expr>=? AND received_at<?)"),
    (DELETE_EXPIRED, delete_params("adt", 5, 10), "INDEX messages_retention (channel=? AND <expr>=? AND received_at<?)"),
    (MESSAGE_CHANNELS, (), "COVERING INDEX messages_retention (channel>?)"),
    ("SELECT callback, reply_body FROM messages WHERE callback IN (?, ?)", ("a", "b"),
     "INDEX sqlite_autoindex_messages_1 (callback=?)"),
    ("SELECT body FROM messages WHERE id > ? AND agent_id = ? ORDER BY id LIMIT 5", (0, "a"),
     "INDEX messages_agent (agent_id=? AND id>?)"),
    ("SELECT body FROM messages WHERE id > ? AND control_id = ? ORDER BY id LIMIT 5", (0, "C1"),
     "INDEX messages_control_id (control_id=? AND rowid>?)"),
])
def test_sqlite_each_message_query_seeks_an_index(tmp_path: Path, sql: str, params: tuple[Any, ...],
                                                  index: str) -> None:
    core = SqliteCore(tmp_path)
    try:
        found = plan(core._conn(), sql, params)
        assert f"SEARCH messages USING {index}" in found and "SCAN messages" not in found, found
    finally:
        core.close()


def test_the_engines_run_the_same_statements() -> None:
    """One list of migrations: only the integer column types differ between the engines."""
    sqlite_v4 = statements(3, SQLITE_TYPES)
    assert sqlite_v4[-1] == ("CREATE INDEX messages_retention ON messages"
                             " (channel, (body_purged_at IS NOT NULL), received_at)")


def pg_plan(url: str, sql: str, params: tuple[Any, ...]) -> str:
    """EXPLAIN with sequential scans priced out: on a table this small PostgreSQL would rather scan
    it, so this asks whether an index *can* serve the statement."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SET enable_seqscan = off")
        return " | ".join(r[0] for r in conn.execute("EXPLAIN " + sql.replace("?", "%s"), params))


async def test_postgres_v3_to_v4_keeps_every_row_and_serves_retention(
        postgres_server: PostgresServer, postgres_url: str) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    columns = ", ".join(TABLE_COLUMNS["messages"])
    old = await PostgresHubStore.open(postgres_url, migrate_to=3)
    try:
        await old.write_round([[incoming(i) for i in range(ROWS)]], ())
        await old.record_results([result(i) for i in range(ROWS) if i % 4])
        await old.write_round([[incoming(9)], [incoming(9)]], ())  # resends: counted twice
        assert await old.purge_bodies("adt", 1_020, 100) == 13  # the v4 statement runs on v3 (unindexed)
    finally:
        await old.close()
    before = postgres_server.sql(f"SELECT {columns} FROM messages ORDER BY id", database)
    assert postgres_server.sql("SELECT version FROM medagent_schema_version", database) == [(3,)]
    store = await PostgresHubStore.open(postgres_url)
    try:
        assert postgres_server.sql(f"SELECT {columns} FROM messages ORDER BY id", database) == before
        indexes = {r[0] for r in postgres_server.sql(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'messages' AND indexname LIKE 'messages_%'", database)}
        assert indexes == V4_INDEXES | {"messages_pkey", "messages_callback_key"}
        assert await store.message_channels() == ["adt", "lab"]
        assert await store.purge_bodies("adt", 1_030, 100) == 7
        assert [await store.delete_messages("adt", 1_040, 8) for _ in range(5)] == [8, 8, 8, 2, 0]
        after = {r[4]: r for r in postgres_server.sql(f"SELECT {columns} FROM messages", database)}
        assert len(after) == ROWS - 26 and after["cb-9"][15] == 2 and after["cb-40"][16] == "cb-3"
        for sql, params in ((PURGE_BODIES, purge_params("adt", 5, 10)), (DELETE_EXPIRED, delete_params("adt", 5, 10))):
            text = pg_plan(postgres_url, sql, params)
            assert "messages_retention" in text and "Seq Scan" not in text, text
    finally:
        await store.close()
