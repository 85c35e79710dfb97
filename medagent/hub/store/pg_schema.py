"""Migrations of the hub's PostgreSQL store: the runner; the statements are medagent.hub.schema's.

The version lives in its own table, ``medagent_schema_version`` (one row): version *n* means
the first *n* entries of :data:`~medagent.hub.schema.MIGRATIONS` have been applied, each in its
own transaction together with the version bump, so a crash leaves the database at a whole
version. Several hub processes may start at once against one database: each migration
transaction first takes a transaction-scoped advisory lock, so exactly one applies it and the
others see the new version. A database newer than this code is refused, never downgraded.
"""

from __future__ import annotations

from typing import Any

from medagent.hub.schema import PG_TYPES, SCHEMA_VERSION, check_version, statements

__all__ = ["SCHEMA_VERSION", "migrate"]

#: pg_advisory_xact_lock key of the migrations ("medagent" in ASCII, as an int8)
_LOCK_KEY = 0x6D65646167656E74


async def migrate(conn: Any, target: int = SCHEMA_VERSION) -> int:
    """Bring ``conn``'s database (a psycopg AsyncConnection, autocommit) up to ``target``;
    returns the version found."""
    found = None
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            await conn.execute("CREATE TABLE IF NOT EXISTS medagent_schema_version (version INTEGER NOT NULL)")
            cur = await conn.execute("SELECT version FROM medagent_schema_version")
            row = await cur.fetchone()
            if row is None:
                await conn.execute("INSERT INTO medagent_schema_version (version) VALUES (0)")
            version = 0 if row is None else int(row[0])
            if found is None:
                found = version
            check_version(version, "--store")
            if version >= target:
                return found
            for statement in statements(version, PG_TYPES):
                await conn.execute(statement)
            await conn.execute("UPDATE medagent_schema_version SET version = %s", (version + 1,))
