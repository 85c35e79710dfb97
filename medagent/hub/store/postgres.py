"""The hub store on PostgreSQL (psycopg 3 async + psycopg_pool), for hubs that outgrow one file.

Why psycopg 3 rather than asyncpg: it is the maintained reference driver, speaks the same SQL
text as the SQLite engine (``%s`` placeholders instead of ``?``; :func:`_pg` converts), sends an
``executemany`` as one pipeline (one network round trip for a whole batch) and ships a pool
(``psycopg_pool``) with health checks. Both are in the ``scale`` extra
(``pip install 'medagent[scale]'``).

Theory of operation
-------------------
One :class:`psycopg_pool.AsyncConnectionPool` (``pool_size`` connections) serves every call; no
call blocks the event loop. The hot path (:meth:`PostgresHubStore.write_round`, driven by the
hub's single StoreWriter) runs one transaction per round: an ``executemany`` of replies, then per
inbound group one ``callback = ANY(...)`` lookup, one ``INSERT … SELECT FROM unnest(arrays) ON
CONFLICT (callback) DO NOTHING RETURNING callback`` (rows an inline bot answered in the round
carry their result) and, when needed, one duplicate-counter update — one statement per step
whatever the batch size. While a
round waits for PostgreSQL the next one accumulates, so groups grow under load.

Dedup, also across hub processes (two may take the same resend at once: an agent that
reconnected elsewhere): a group is inserted with ``ON CONFLICT (callback) DO NOTHING`` (after
one lookup when the intake answers inline bots in the round, else before anything is looked
up); the UNIQUE index makes a concurrent INSERT of the same callback wait for
the first transaction and then do nothing. A row the round did not insert was stored before: it
is counted as a duplicate and answered with its stored reply. A deadlock or serialization failure
between two rounds retries the round (at most :data:`ROUND_ATTEMPTS` times).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import orjson

from medagent.hub.auth import hash_secret, new_client_secret
from medagent.hub.records import (
    AgentCredentials,
    AgentRecord,
    AgentStatus,
    Answer,
    BotRecord,
    ChannelRecord,
    ChannelStatus,
    IncomingMessage,
    IntakeKind,
    IntakeResult,
    MessagePage,
    MessageQuery,
    MessageRecord,
    MessageResult,
    ResourceRecord,
    StoredReply,
)
from medagent.hub.store.base import HubStore
from medagent.hub.store.common import (
    AGENT_SELECT,
    CHANNEL_BOT_SELECT,
    CHANNEL_SELECT,
    DEFAULT_BOT,
    DELETE_EXPIRED,
    DELETE_OLDEST,
    INSERT_WIDTH,
    MAX_PAGE,
    MESSAGE_CHANNELS,
    MESSAGE_COLUMNS,
    PURGE_BODIES,
    RESOURCE_SELECT,
    TABLE_COLUMNS,
    InvalidValue,
    NotFound,
    StoreError,
    StoreUnavailable,
    agent_row,
    channel_row,
    check_address,
    check_bot_spec,
    check_query_range,
    delete_params,
    export_sql,
    import_sql,
    message_filters,
    message_row,
    now_ms,
    plan_group,
    purge_params,
    resource_row,
    result_params,
    row_key,
    wanted_callbacks,
)
from medagent.hub.store.pg_schema import migrate

__all__ = ["PostgresHubStore", "redact"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5
ROUND_ATTEMPTS = 3
INSTALL_HINT = "install the PostgreSQL driver: pip install 'medagent[scale]'"


def redact(url: str) -> str:
    """``url`` without its password (for logs and errors)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """SQL written with ``?`` placeholders (shared with SQLite) in psycopg's ``%s`` style."""
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresHubStore(HubStore):
    """Async hub store on a PostgreSQL database. Use :meth:`open`, never the constructor."""

    stores_nul = False

    def __init__(self, url: str, pool: Any, psycopg: Any) -> None:
        self.url = redact(url)
        self._pool = pool
        self._psycopg = psycopg
        self.config_generation = 0

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 10, migrate_to: int | None = None) -> PostgresHubStore:
        """Connect, migrate the schema forward, and return the store (StoreUnavailable if not)."""
        try:
            import psycopg
            from psycopg_pool import AsyncConnectionPool
        except ImportError:
            raise StoreUnavailable(f"the store {redact(url)} needs psycopg 3 and psycopg_pool; {INSTALL_HINT}") from None
        where = _server_of(psycopg, url)
        try:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.OperationalError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = lines[0].rpartition(" failed: ")[2] if lines else type(exc).__name__  # "Connection refused"
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL at {where} ({reason}); check that the server runs and accepts"
                f" connections there, and the user, password and database in --store / [hub] store"
            ) from None
        except psycopg.ProgrammingError as exc:
            raise StoreUnavailable(f"bad PostgreSQL URL {redact(url)!r}: {exc}") from None
        try:
            async with conn:
                if migrate_to is None:
                    await migrate(conn)
                else:
                    await migrate(conn, migrate_to)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot prepare the hub schema in PostgreSQL at {where}: {exc}") from None
        pool = AsyncConnectionPool(url, min_size=1, max_size=max(1, pool_size), open=False,
                                   kwargs={"autocommit": True}, name="medagent-hub-store")
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S * 2)
        return cls(url, pool, psycopg)

    async def close(self) -> None:
        await self._pool.close()

    # -- helpers ------------------------------------------------------------------------------

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(_pg(sql), params)
            return await cur.fetchone()

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(_pg(sql), params)
            return await cur.fetchall()

    async def _rowcount(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(_pg(sql), params)
            return cur.rowcount

    # -- agents -------------------------------------------------------------------------------

    async def add_agent(self, name: str, settings: dict[str, Any] | None = None) -> AgentCredentials:
        name = name.strip()
        if not name:
            raise InvalidValue("an agent name must not be empty")
        credentials = AgentCredentials(str(uuid.uuid4()), str(uuid.uuid4()), new_client_secret())
        secret_hash = await asyncio.to_thread(hash_secret, credentials.client_secret)
        stamp = now_ms()
        try:
            await self._rowcount(
                "INSERT INTO agents (id, name, status, client_id, secret_hash, settings, created_at, updated_at)"
                " VALUES (?, ?, 'active', ?, ?, ?, ?, ?)",
                (credentials.agent_id, name, credentials.client_id, secret_hash,
                 orjson.dumps(settings or {}).decode(), stamp, stamp),
            )
        except self._psycopg.errors.UniqueViolation:
            raise StoreError(f"an agent named {name!r} already exists") from None
        return credentials

    async def reset_client_secret(self, agent_id: str) -> AgentCredentials:
        agent = await self.get_agent(agent_id)
        secret = new_client_secret()
        await self._update_agent(agent_id, "secret_hash", await asyncio.to_thread(hash_secret, secret), revoke=True)
        return AgentCredentials(agent.id, agent.client_id, secret)

    async def get_agent(self, agent_id: str) -> AgentRecord:
        row = await self._one(AGENT_SELECT + " WHERE id = ?", (agent_id,))
        if row is None:
            raise NotFound(f"no agent with id {agent_id!r}")
        return agent_row(row)

    async def find_agent(self, id_or_name: str) -> AgentRecord:
        row = await self._one(AGENT_SELECT + " WHERE id = ? OR name = ? ORDER BY (id = ?) DESC LIMIT 1",
                              (id_or_name, id_or_name, id_or_name))
        if row is None:
            raise NotFound(f"no agent with id or name {id_or_name!r}")
        return agent_row(row)

    async def list_agents(self, name: str | None = None) -> list[AgentRecord]:
        if name is None:
            rows = await self._all(AGENT_SELECT + " ORDER BY name")
        else:
            rows = await self._all(AGENT_SELECT + " WHERE name = ?", (name,))
        return [agent_row(r) for r in rows]

    async def client_secret_hash(self, client_id: str) -> tuple[str, str, int] | None:
        row = await self._one("SELECT id, secret_hash, token_generation FROM agents WHERE client_id = ?", (client_id,))
        return None if row is None else (row[0], row[1], int(row[2]))

    async def token_generation(self, agent_id: str) -> int | None:
        row = await self._one("SELECT token_generation FROM agents WHERE id = ?", (agent_id,))
        return None if row is None else int(row[0])

    async def revoke_tokens(self, agent_id: str) -> int:
        row = await self._one(
            "UPDATE agents SET token_generation = token_generation + 1, updated_at = ? WHERE id = ?"
            " RETURNING token_generation", (now_ms(), agent_id))
        if row is None:
            raise NotFound(f"no agent with id {agent_id!r}")
        return int(row[0])

    async def shared_secret(self, name: str, proposed: str) -> str:
        async with self._pool.connection() as conn:
            await conn.execute(_pg("INSERT INTO hub_secrets (name, value, created_at) VALUES (?, ?, ?)"
                                   " ON CONFLICT (name) DO NOTHING"), (name, proposed, now_ms()))
            cur = await conn.execute(_pg("SELECT value FROM hub_secrets WHERE name = ?"), (name,))
            return str((await cur.fetchone())[0])

    async def set_upgrade_status(self, agent_id: str, status: str) -> None:
        await self._rowcount("INSERT INTO agent_upgrades (agent_id, status, updated_at) VALUES (?, ?, ?)"
                             " ON CONFLICT (agent_id) DO UPDATE SET status = excluded.status,"
                             " updated_at = excluded.updated_at", (agent_id, status, now_ms()))

    async def upgrade_status(self, agent_id: str) -> str | None:
        row = await self._one("SELECT status FROM agent_upgrades WHERE agent_id = ?", (agent_id,))
        return None if row is None else str(row[0])

    async def set_agent_status(self, agent_id: str, status: AgentStatus) -> None:
        status = AgentStatus(status)
        await self._update_agent(agent_id, "status", status.value, revoke=status is AgentStatus.OFF)

    async def set_agent_settings(self, agent_id: str, settings: dict[str, Any]) -> None:
        await self._update_agent(agent_id, "settings", orjson.dumps(settings).decode())

    async def _update_agent(self, agent_id: str, column: str, value: str, revoke: bool = False) -> None:
        self.config_generation += 1
        bump = ", token_generation = token_generation + 1" if revoke else ""
        changed = await self._rowcount(f"UPDATE agents SET {column} = ?, updated_at = ?{bump} WHERE id = ?",
                                       (value, now_ms(), agent_id))
        if changed == 0:
            raise NotFound(f"no agent with id {agent_id!r}")

    # -- bots and channels --------------------------------------------------------------------

    async def ensure_bot(self, callable_spec: str, name: str | None = None) -> BotRecord:
        check_bot_spec(callable_spec)
        await self._rowcount("INSERT INTO bots (id, name, callable) VALUES (?, ?, ?) ON CONFLICT (callable) DO NOTHING",
                             (str(uuid.uuid4()), name or callable_spec, callable_spec))
        row = await self._one("SELECT id, name, callable FROM bots WHERE callable = ?", (callable_spec,))
        assert row is not None  # inserted above or already there; bots are never deleted
        return BotRecord(*row)

    async def get_bot(self, bot_id: str) -> BotRecord:
        row = await self._one("SELECT id, name, callable FROM bots WHERE id = ?", (bot_id,))
        if row is None:
            raise NotFound(f"no bot with id {bot_id!r}")
        return BotRecord(*row)

    async def add_channel(self, agent_id: str, name: str, address: str, bot: str = DEFAULT_BOT) -> ChannelRecord:
        self.config_generation += 1
        if not name.strip():
            raise InvalidValue("a channel name must not be empty")
        check_address(address)
        await self.get_agent(agent_id)
        bot_record = await self.ensure_bot(bot)
        channel = ChannelRecord(str(uuid.uuid4()), agent_id, name.strip(), address, bot_record.id, ChannelStatus.ACTIVE)
        try:
            await self._rowcount(
                "INSERT INTO channels (id, agent_id, name, address, bot_id, status) VALUES (?, ?, ?, ?, ?, ?)",
                (channel.id, agent_id, channel.name, address, bot_record.id, channel.status.value))
        except self._psycopg.errors.UniqueViolation:
            raise StoreError(f"the agent already has a channel named {name!r}") from None
        return channel

    async def update_channel(self, channel_id: str, *, address: str | None = None, bot: str | None = None,
                             status: ChannelStatus | None = None) -> ChannelRecord:
        self.config_generation += 1
        current = await self.get_channel(channel_id)
        if address is not None:
            check_address(address)
        bot_id = (await self.ensure_bot(bot)).id if bot is not None else current.bot_id
        updated = ChannelRecord(current.id, current.agent_id, current.name, address or current.address, bot_id,
                                ChannelStatus(status) if status is not None else current.status)
        await self._rowcount("UPDATE channels SET address = ?, bot_id = ?, status = ? WHERE id = ?",
                             (updated.address, updated.bot_id, updated.status.value, channel_id))
        return updated

    async def remove_channel(self, channel_id: str) -> None:
        self.config_generation += 1
        if await self._rowcount("DELETE FROM channels WHERE id = ?", (channel_id,)) == 0:
            raise NotFound(f"no channel (Endpoint) with id {channel_id!r}")

    async def get_channel(self, channel_id: str) -> ChannelRecord:
        row = await self._one(CHANNEL_SELECT + " WHERE id = ?", (channel_id,))
        if row is None:
            raise NotFound(f"no channel (Endpoint) with id {channel_id!r}")
        return channel_row(row)

    async def list_channels(self, agent_id: str) -> list[ChannelRecord]:
        return [channel_row(r) for r in await self._all(CHANNEL_SELECT + " WHERE agent_id = ? ORDER BY name", (agent_id,))]

    async def channel_bot(self, agent_id: str, channel_name: str) -> tuple[ChannelRecord, BotRecord] | None:
        row = await self._one(CHANNEL_BOT_SELECT, (agent_id, channel_name))
        return None if row is None else (channel_row(row[:6]), BotRecord(*row[6:]))

    # -- messages (hot path) ------------------------------------------------------------------

    async def write_round(
        self, incoming: Sequence[Sequence[IncomingMessage]], results: Iterable[MessageResult],
        answers: Sequence[Answer | None] = (), before_commit: Callable[[], None] | None = None,
    ) -> list[list[IntakeResult]]:
        del before_commit  # never called: an insert can still meet another hub process's row (HubStore)
        rows = [result_params(r) for r in results]
        if not rows and not any(incoming):
            return [[] for _ in incoming]
        answers = answers or [None] * len(incoming)
        errors = self._psycopg.errors
        for attempt in range(1, ROUND_ATTEMPTS + 1):
            try:
                async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                    if rows:
                        await cur.execute(_RECORD_RESULTS, _columns(rows, 7))
                    return [await self._store_group(cur, group, answer) if group else []
                            for group, answer in zip(incoming, answers, strict=True)]
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == ROUND_ATTEMPTS:
                    raise
                log.warning("hub store round collided with another hub process (attempt %d); retrying", attempt)
        raise AssertionError("unreachable")

    async def _store_group(self, cur: Any, messages: Sequence[IncomingMessage],
                           answer: Answer | None) -> list[IntakeResult]:
        """Without ``answer``, insert first and look up after: the common group (no resends)
        costs one statement; only the originals that flagged copies name are looked up before.
        With ``answer``, every callback is looked up first (one statement), so the bots run only
        for messages not stored yet and each row is inserted with its result (no UPDATE, no dead
        row version). Either way a callback already stored (a resend, or one another hub process
        stored meanwhile: then its answer here is dropped) is an INSERT that does nothing, and is
        then counted and answered with its stored reply."""
        known = await _known_callbacks(
            cur, wanted_callbacks(messages) if answer is not None else {m.duplicate_of for m in messages if m.duplicate_of})
        inserts, resends, answered, results = plan_group(messages, known, answer)
        inserted: set[str] = set()
        if inserts:
            await cur.execute(_INSERT_NEW, _columns(inserts, INSERT_WIDTH))
            inserted.update(r[0] for r in await cur.fetchall())
        stored_before = {row[3] for row in inserts} - inserted
        if stored_before:
            resends += [(c,) for c in stored_before]
            replies = await _known_callbacks(cur, stored_before)
            for i, m in enumerate(messages):
                if m.callback in stored_before:
                    results[i] = IntakeResult(IntakeKind.DUPLICATE, replies.get(m.callback))
        if resends:
            await cur.execute(_COUNT_RESENDS, ([c for (c,) in resends],))
        if answered:
            await cur.execute(_RECORD_RESULTS, _columns(answered, 7))
        return results

    # -- messages (queries) -------------------------------------------------------------------

    async def query_messages(self, query: MessageQuery) -> MessagePage:
        check_query_range(query)
        limit = max(1, min(query.limit, MAX_PAGE))
        where, params = message_filters(query)
        columns = MESSAGE_COLUMNS.format(body="body" if query.include_body else "NULL")
        rows = await self._all(f"SELECT {columns} FROM messages WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
                               (*params, limit + 1))
        records = tuple(message_row(r) for r in rows[:limit])
        return MessagePage(records, records[-1].id if len(rows) > limit else None)

    async def get_message(self, callback: str) -> MessageRecord:
        row = await self._one(f"SELECT {MESSAGE_COLUMNS.format(body='body')} FROM messages WHERE callback = ?",
                              (callback,))
        if row is None:
            raise NotFound(f"no message with callback {callback!r}")
        return message_row(row)

    # -- retention ----------------------------------------------------------------------------

    async def message_channels(self) -> list[str]:
        """Every channel name with stored messages (a recursive index skip-scan, as on SQLite)."""
        return [r[0] for r in await self._all(MESSAGE_CHANNELS)]

    async def purge_bodies(self, channel: str, received_before: int, limit: int) -> int:
        return await self._rowcount(PURGE_BODIES, purge_params(channel, received_before, limit))

    async def delete_messages(self, channel: str, received_before: int, limit: int) -> int:
        return await self._rowcount(DELETE_EXPIRED, delete_params(channel, received_before, limit))

    async def delete_oldest_messages(self, limit: int) -> int:
        return await self._rowcount(DELETE_OLDEST, (limit,))

    async def live_bytes(self) -> int:
        """Bytes the live rows of messages and resources take. Table files shrink only on VACUUM
        FULL, so their size would never fall after a delete; this sums the rows instead (a scan:
        retention reads it once per step, no more)."""
        row = await self._one(
            "SELECT (SELECT coalesce(sum(pg_column_size(m.*)), 0) FROM messages m)"
            " + (SELECT coalesce(sum(pg_column_size(r.*)), 0) FROM resources r)")
        return int(row[0]) if row else 0

    async def free_page_bytes(self) -> int:
        return 0  # the database's files are on the server, not on the hub's disk

    # -- resources ----------------------------------------------------------------------------

    async def upsert_resource(self, resource_type: str, identifier: str, resource: dict[str, Any]) -> ResourceRecord:
        stamp = now_ms()
        new_id = str(uuid.uuid4())
        async with self._pool.connection() as conn, conn.transaction():
            # insert-or-keep by (type, identifier) first, so concurrent upserts agree on one id
            cur = await conn.execute(_pg(
                "INSERT INTO resources (resource_type, id, identifier, resource, updated_at) VALUES (?, ?, ?, '{}', ?)"
                " ON CONFLICT (resource_type, identifier) DO UPDATE SET updated_at = excluded.updated_at"
                " RETURNING id"), (resource_type, new_id, identifier, stamp))
            row = await cur.fetchone()
            resource_id = row[0]
            stored = {**resource, "resourceType": resource_type, "id": resource_id}
            await conn.execute(_pg("UPDATE resources SET resource = ? WHERE resource_type = ? AND id = ?"),
                               (orjson.dumps(stored).decode(), resource_type, resource_id))
        return ResourceRecord(resource_type, resource_id, identifier, stored, stamp)

    async def get_resource(self, resource_type: str, resource_id: str) -> ResourceRecord:
        row = await self._one(RESOURCE_SELECT + " WHERE resource_type = ? AND id = ?", (resource_type, resource_id))
        if row is None:
            raise NotFound(f"no {resource_type} with id {resource_id!r}")
        return resource_row(row)

    async def find_resources(self, resource_type: str, identifier: str | None = None,
                             limit: int = 100) -> list[ResourceRecord]:
        sql = RESOURCE_SELECT + " WHERE resource_type = ?"
        params: list[Any] = [resource_type]
        if identifier is not None:
            sql += " AND identifier = ?"
            params.append(identifier)
        rows = await self._all(sql + " ORDER BY id LIMIT ?", (*params, max(1, min(limit, MAX_PAGE))))
        return [resource_row(r) for r in rows]

    # -- bulk copy ----------------------------------------------------------------------------

    async def count_rows(self, table: str) -> int:
        if table not in TABLE_COLUMNS:
            raise InvalidValue(f"unknown table {table!r}")
        row = await self._one(f"SELECT count(*) FROM {table}")
        return int(row[0]) if row else 0

    async def export_rows(self, table: str, batch: int) -> AsyncIterator[list[tuple[Any, ...]]]:  # type: ignore[override]
        after: tuple[Any, ...] | None = None
        while True:
            rows = await self._all(export_sql(table, after), (*(after or ()), batch))
            if not rows:
                return
            yield [tuple(r) for r in rows]
            after = row_key(table, rows[-1])

    async def import_rows(self, table: str, rows: Sequence[tuple[Any, ...]]) -> int:
        if not rows:
            return 0
        async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            sql = import_sql(table).replace(" ON CONFLICT DO NOTHING", " ON CONFLICT DO NOTHING RETURNING 1")
            await cur.executemany(_pg(sql), rows, returning=True)
            count = 0
            while True:
                count += len(await cur.fetchall())
                if not cur.nextset():
                    break
            if table == "messages":  # new rows must get ids after the copied ones
                await cur.execute("SELECT setval(pg_get_serial_sequence('messages', 'id'),"
                                  " (SELECT coalesce(max(id), 1) FROM messages))")
        return count


# The hot path sends each batch as ONE statement over arrays (unnest), not one statement per row:
# measured (benchmarks/hub_store.py) a pipelined executemany cost the hub several times the CPU
# per message of one array statement, and PostgreSQL parses and plans it once.
_INSERT_NEW = (
    "INSERT INTO messages (agent_id, channel, remote, callback, control_id, message_type, content_type, body,"
    " received_at, duplicate, duplicate_of, status, reply_body, reply_content_type, reply_status, error,"
    " processed_at) SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[],"
    " %b::text[], %b::text[], %b::text[], %b::text[], %b::bigint[], %b::int[], %b::text[],"
    " %b::text[], %b::text[], %b::text[], %b::int[], %b::text[], %b::bigint[])"
    " ON CONFLICT (callback) DO NOTHING RETURNING callback"
)
_RECORD_RESULTS = (
    "UPDATE messages AS m SET status = r.status, reply_body = r.reply_body, reply_content_type = r.reply_content_type,"
    " reply_status = r.reply_status, error = r.error, processed_at = r.processed_at"
    " FROM unnest(%b::text[], %b::text[], %b::text[], %b::int[], %b::text[], %b::bigint[], %b::text[])"
    " AS r(status, reply_body, reply_content_type, reply_status, error, processed_at, callback)"
    " WHERE m.callback = r.callback"
)
_COUNT_RESENDS = (
    "UPDATE messages AS m SET duplicate = m.duplicate + r.n"
    " FROM (SELECT c, count(*) AS n FROM unnest(%b::text[]) AS c GROUP BY c) AS r WHERE m.callback = r.c"
)


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as ``width`` column lists (the arrays the statements above unnest)."""
    return [list(column) for column in zip(*rows)] if rows else [[] for _ in range(width)]


async def _known_callbacks(cur: Any, callbacks: set[str]) -> dict[str, StoredReply | None]:
    """Stored callbacks among ``callbacks``, each with its stored reply (``None`` if unanswered)."""
    if not callbacks:
        return {}
    await cur.execute("SELECT callback, reply_body, reply_content_type, reply_status FROM messages"
                      " WHERE callback = ANY(%s)", (list(callbacks),))
    return {callback: None if body is None else StoredReply(body, content_type, status)
            for callback, body, content_type, status in await cur.fetchall()}


def _server_of(psycopg: Any, url: str) -> str:
    """``host:port`` (or the socket directory) of a PostgreSQL URL, for error messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise StoreUnavailable(f"bad PostgreSQL URL {redact(url)!r}: {exc}") from None
    host = str(info.get("host") or "localhost")
    return f"{host}:{info.get('port') or 5432}"
