"""Schema of the hub's SQLite store and its forward-only migrations.

The schema version is SQLite's ``PRAGMA user_version``: version *n* means the first *n*
entries of :data:`MIGRATIONS` have been applied, each in its own transaction together with the
version bump, so a crash leaves the database at a whole version. A database whose version is
higher than this code knows is refused (never downgraded): it was written by a newer medagent.
"""

from __future__ import annotations

import sqlite3

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SchemaError", "migrate"]


class SchemaError(RuntimeError):
    """The hub database cannot be used by this version of medagent."""


MIGRATIONS: tuple[str, ...] = (
    # v1: agents, bots, channels, messages, resources
    """
    CREATE TABLE agents (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        status      TEXT NOT NULL DEFAULT 'active',
        client_id   TEXT NOT NULL UNIQUE,
        secret_hash TEXT NOT NULL,
        settings    TEXT NOT NULL DEFAULT '{}',
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    );
    CREATE TABLE bots (
        id       TEXT PRIMARY KEY,
        name     TEXT NOT NULL,
        callable TEXT NOT NULL UNIQUE
    );
    CREATE TABLE channels (
        id       TEXT PRIMARY KEY,
        agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
        name     TEXT NOT NULL,
        address  TEXT NOT NULL,
        bot_id   TEXT NOT NULL REFERENCES bots(id),
        status   TEXT NOT NULL DEFAULT 'active',
        UNIQUE (agent_id, name)
    );
    CREATE TABLE messages (
        id                 INTEGER PRIMARY KEY,
        agent_id           TEXT NOT NULL,
        channel            TEXT NOT NULL,
        remote             TEXT NOT NULL,
        callback           TEXT NOT NULL UNIQUE,
        control_id         TEXT,
        message_type       TEXT,
        content_type       TEXT NOT NULL,
        body               TEXT NOT NULL,
        received_at        INTEGER NOT NULL,
        status             TEXT NOT NULL DEFAULT 'received',
        reply_body         TEXT,
        reply_content_type TEXT,
        reply_status       INTEGER,
        error              TEXT,
        duplicate          INTEGER NOT NULL DEFAULT 0,
        duplicate_of       TEXT,
        processed_at       INTEGER
    );
    CREATE INDEX messages_agent ON messages (agent_id, id);
    CREATE INDEX messages_control_id ON messages (control_id);
    CREATE TABLE resources (
        resource_type TEXT NOT NULL,
        id            TEXT NOT NULL,
        identifier    TEXT NOT NULL,
        resource      TEXT NOT NULL,
        updated_at    INTEGER NOT NULL,
        PRIMARY KEY (resource_type, id),
        UNIQUE (resource_type, identifier)
    );
    """,
    # v2: token revocation (a per-agent token generation) and retention (medagent.hub.retention):
    # bodies are purged before rows. Both indexes list exactly the rows a retention step may
    # still touch (a deleted row leaves the first, a purged body leaves the second), so each
    # step reads only the rows it changes, never rows it skipped before.
    """
    ALTER TABLE agents ADD COLUMN token_generation INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE messages ADD COLUMN body_purged_at INTEGER;
    CREATE INDEX messages_channel_age ON messages (channel, received_at);
    CREATE INDEX messages_channel_body_age ON messages (channel, received_at) WHERE body_purged_at IS NULL;
    """,
    # v3: secrets every hub process of one store shares (the token signing key, the admin
    # token), so that several processes with their own data directories act as one hub; and
    # the last known outcome of each agent's remote upgrade, for $status on any process.
    """
    CREATE TABLE hub_secrets (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE agent_upgrades (
        agent_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring ``conn``'s database up to :data:`SCHEMA_VERSION`; returns the version found."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise SchemaError(
            f"the hub database has schema version {found}, newer than this medagent knows "
            f"({SCHEMA_VERSION}); upgrade medagent or point --data-dir elsewhere"
        )
    for version in range(found, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return found


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
