"""The hub store on one SQLite file (the default; ``medagent serve``'s embedded hub).

Theory of operation
-------------------
One database, ``<data_dir>/hub.sqlite3``, in WAL mode (readers never block the writer),
``synchronous=NORMAL`` (a commit survives a process crash; the last commits may be lost on
power loss) and a 5 s busy timeout, so a CLI command may write beside a running hub. The schema
is versioned and migrated forward only (:mod:`medagent.hub.schema`).

:class:`SqliteCore` is the synchronous engine: each thread gets its own connection
(``threading.local``), connections run in autocommit mode and every write is an explicit
``BEGIN IMMEDIATE … COMMIT``. :class:`SqliteHubStore` is the async face the hub uses: reads and
admin writes run on a small thread pool, so the event loop never waits on SQLite for them.

The hot path (:meth:`SqliteHubStore.write_round`, called by the hub's single StoreWriter) and
retention's bounded delete/purge steps run where the writer runs, so they never contend for
SQLite's write lock with each other; that is inline on the event loop thread by default: measured end to end (docs/hub-store.md) handing each
round to a dedicated writer thread cost more in wake-ups and GIL hand-offs than the commit
itself. ``writer_thread=True`` selects the threaded variant (kept for the benchmark). WAL
checkpoints (an fsync each) are kept out of hot-path commits: the writer's connection turns
automatic checkpoints off and a WalCheckpointer thread runs them.

Hot path shape: one lookup of the callbacks already known and one ``executemany`` insert per
group (a message its inline bot answered in the round is inserted with its result), plus, only
when there are any, an update of duplicate counters and of the results of messages answered
later (other bots) — all in one transaction.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

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
    IntakeResult,
    MessagePage,
    MessageQuery,
    MessageRecord,
    MessageResult,
    ResourceRecord,
    StoredReply,
)
from medagent.hub.schema import migrate
from medagent.hub.store.base import HubStore
from medagent.hub.store.common import (
    AGENT_SELECT,
    CHANNEL_BOT_SELECT,
    CHANNEL_SELECT,
    COUNT_RESEND,
    DB_FILE,
    DEFAULT_BOT,
    DELETE_EXPIRED,
    DELETE_OLDEST,
    INSERT_MESSAGE,
    LOOKUP_CHUNK,
    MAX_PAGE,
    MESSAGE_CHANNELS,
    MESSAGE_COLUMNS,
    PURGE_BODIES,
    RECORD_RESULT,
    RESOURCE_SELECT,
    TABLE_COLUMNS,
    InvalidValue,
    NotFound,
    StoreError,
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
from medagent.storage.checkpoint import WAL_SIZE_LIMIT_BYTES, WalCheckpointer
from medagent.storage.files import ensure_private_dir, prepare_private_database

__all__ = ["SqliteCore", "SqliteHubStore"]

T = TypeVar("T")
#: threads for reads and admin writes (SQLite serialises writers anyway; reads run side by side)
READ_THREADS = 4


class SqliteCore:
    """The synchronous SQLite engine; safe to use from several threads."""

    def __init__(self, data_dir: Path, file_name: str = DB_FILE) -> None:
        self.data_dir = ensure_private_dir(data_dir)  # 0700: message bodies are patient data
        self.path = self.data_dir / file_name
        prepare_private_database(self.path)  # 0600, and SQLite gives -wal/-shm the same mode
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.writer_gate = threading.Lock()  # held around each write transaction (_write)
        self._closed = False
        self.config_generation = 0
        migrate(self._conn())

    # -- connections ------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StoreError("the hub store is closed")
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")  # the checkpointer never TRUNCATEs under load
            conn.execute("PRAGMA temp_store=MEMORY")  # no temp files: freeing them can wait for a discard (queue/store.py)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def disable_autocheckpoint(self) -> None:
        """This thread's connection leaves WAL checkpoints to a WalCheckpointer."""
        self._conn().execute("PRAGMA wal_autocheckpoint=0")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        with self.writer_gate:  # the checkpointer's RESTART takes it first (WalCheckpointer.writer_gate)
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (a deferred constraint, an I/O error) can leave the transaction
                # open; the next BEGIN on this connection would then fail too.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close every connection (of every thread). Further use raises :class:`StoreError`."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()

    # -- agents -----------------------------------------------------------------------------

    def add_agent(self, name: str, settings: dict[str, Any] | None = None) -> AgentCredentials:
        name = name.strip()
        if not name:
            raise InvalidValue("an agent name must not be empty")
        credentials = AgentCredentials(str(uuid.uuid4()), str(uuid.uuid4()), new_client_secret())
        secret_hash = hash_secret(credentials.client_secret)
        stamp = now_ms()
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO agents (id, name, status, client_id, secret_hash, settings,"
                    " created_at, updated_at) VALUES (?, ?, 'active', ?, ?, ?, ?, ?)",
                    (credentials.agent_id, name, credentials.client_id, secret_hash,
                     orjson.dumps(settings or {}).decode(), stamp, stamp),
                )
        except sqlite3.IntegrityError:
            raise StoreError(f"an agent named {name!r} already exists") from None
        return credentials

    def reset_client_secret(self, agent_id: str) -> AgentCredentials:
        agent = self.get_agent(agent_id)
        secret = new_client_secret()
        self._update_agent(agent_id, "secret_hash", hash_secret(secret), revoke=True)
        return AgentCredentials(agent.id, agent.client_id, secret)

    def get_agent(self, agent_id: str) -> AgentRecord:
        row = self._conn().execute(AGENT_SELECT + " WHERE id = ?", (agent_id,)).fetchone()
        if row is None:
            raise NotFound(f"no agent with id {agent_id!r}")
        return agent_row(row)

    def find_agent(self, id_or_name: str) -> AgentRecord:
        row = self._conn().execute(
            AGENT_SELECT + " WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1",
            (id_or_name, id_or_name, id_or_name),
        ).fetchone()
        if row is None:
            raise NotFound(f"no agent with id or name {id_or_name!r}")
        return agent_row(row)

    def list_agents(self, name: str | None = None) -> list[AgentRecord]:
        if name is None:
            rows = self._conn().execute(AGENT_SELECT + " ORDER BY name").fetchall()
        else:
            rows = self._conn().execute(AGENT_SELECT + " WHERE name = ?", (name,)).fetchall()
        return [agent_row(r) for r in rows]

    def client_secret_hash(self, client_id: str) -> tuple[str, str, int] | None:
        row = self._conn().execute(
            "SELECT id, secret_hash, token_generation FROM agents WHERE client_id = ?", (client_id,)
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def token_generation(self, agent_id: str) -> int | None:
        row = self._conn().execute("SELECT token_generation FROM agents WHERE id = ?", (agent_id,)).fetchone()
        return None if row is None else int(row[0])

    def revoke_tokens(self, agent_id: str) -> int:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE agents SET token_generation = token_generation + 1, updated_at = ? WHERE id = ?",
                (now_ms(), agent_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no agent with id {agent_id!r}")
            return int(conn.execute("SELECT token_generation FROM agents WHERE id = ?", (agent_id,)).fetchone()[0])

    def shared_secret(self, name: str, proposed: str) -> str:
        with self._write() as conn:
            conn.execute("INSERT INTO hub_secrets (name, value, created_at) VALUES (?, ?, ?)"
                         " ON CONFLICT (name) DO NOTHING", (name, proposed, now_ms()))
            return str(conn.execute("SELECT value FROM hub_secrets WHERE name = ?", (name,)).fetchone()[0])

    def set_upgrade_status(self, agent_id: str, status: str) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO agent_upgrades (agent_id, status, updated_at) VALUES (?, ?, ?)"
                         " ON CONFLICT (agent_id) DO UPDATE SET status = excluded.status,"
                         " updated_at = excluded.updated_at", (agent_id, status, now_ms()))

    def upgrade_status(self, agent_id: str) -> str | None:
        row = self._conn().execute("SELECT status FROM agent_upgrades WHERE agent_id = ?", (agent_id,)).fetchone()
        return None if row is None else str(row[0])

    def set_agent_status(self, agent_id: str, status: AgentStatus) -> None:
        status = AgentStatus(status)
        self._update_agent(agent_id, "status", status.value, revoke=status is AgentStatus.OFF)

    def set_agent_settings(self, agent_id: str, settings: dict[str, Any]) -> None:
        self._update_agent(agent_id, "settings", orjson.dumps(settings).decode())

    def _update_agent(self, agent_id: str, column: str, value: str, revoke: bool = False) -> None:
        self.config_generation += 1
        bump = ", token_generation = token_generation + 1" if revoke else ""
        with self._write() as conn:
            cur = conn.execute(
                f"UPDATE agents SET {column} = ?, updated_at = ?{bump} WHERE id = ?", (value, now_ms(), agent_id)
            )
        if cur.rowcount == 0:
            raise NotFound(f"no agent with id {agent_id!r}")

    # -- bots and channels ------------------------------------------------------------------

    def ensure_bot(self, callable_spec: str, name: str | None = None) -> BotRecord:
        check_bot_spec(callable_spec)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO bots (id, name, callable) VALUES (?, ?, ?) ON CONFLICT (callable) DO NOTHING",
                (str(uuid.uuid4()), name or callable_spec, callable_spec),
            )
            row = conn.execute("SELECT id, name, callable FROM bots WHERE callable = ?", (callable_spec,)).fetchone()
        return BotRecord(*row)

    def get_bot(self, bot_id: str) -> BotRecord:
        row = self._conn().execute("SELECT id, name, callable FROM bots WHERE id = ?", (bot_id,)).fetchone()
        if row is None:
            raise NotFound(f"no bot with id {bot_id!r}")
        return BotRecord(*row)

    def add_channel(self, agent_id: str, name: str, address: str, bot: str = DEFAULT_BOT) -> ChannelRecord:
        self.config_generation += 1
        if not name.strip():
            raise InvalidValue("a channel name must not be empty")
        check_address(address)
        self.get_agent(agent_id)
        bot_record = self.ensure_bot(bot)
        channel = ChannelRecord(str(uuid.uuid4()), agent_id, name.strip(), address, bot_record.id, ChannelStatus.ACTIVE)
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO channels (id, agent_id, name, address, bot_id, status) VALUES (?, ?, ?, ?, ?, ?)",
                    (channel.id, agent_id, channel.name, address, bot_record.id, channel.status.value),
                )
        except sqlite3.IntegrityError:
            raise StoreError(f"the agent already has a channel named {name!r}") from None
        return channel

    def update_channel(self, channel_id: str, *, address: str | None = None, bot: str | None = None,
                       status: ChannelStatus | None = None) -> ChannelRecord:
        self.config_generation += 1
        current = self.get_channel(channel_id)
        if address is not None:
            check_address(address)
        bot_id = self.ensure_bot(bot).id if bot is not None else current.bot_id
        updated = ChannelRecord(current.id, current.agent_id, current.name, address or current.address, bot_id,
                                ChannelStatus(status) if status is not None else current.status)
        with self._write() as conn:
            conn.execute(
                "UPDATE channels SET address = ?, bot_id = ?, status = ? WHERE id = ?",
                (updated.address, updated.bot_id, updated.status.value, channel_id),
            )
        return updated

    def remove_channel(self, channel_id: str) -> None:
        self.config_generation += 1
        with self._write() as conn:
            cur = conn.execute("DELETE FROM channels WHERE id = ?", (channel_id,))
        if cur.rowcount == 0:
            raise NotFound(f"no channel (Endpoint) with id {channel_id!r}")

    def get_channel(self, channel_id: str) -> ChannelRecord:
        row = self._conn().execute(CHANNEL_SELECT + " WHERE id = ?", (channel_id,)).fetchone()
        if row is None:
            raise NotFound(f"no channel (Endpoint) with id {channel_id!r}")
        return channel_row(row)

    def list_channels(self, agent_id: str) -> list[ChannelRecord]:
        rows = self._conn().execute(CHANNEL_SELECT + " WHERE agent_id = ? ORDER BY name", (agent_id,)).fetchall()
        return [channel_row(r) for r in rows]

    def channel_bot(self, agent_id: str, channel_name: str) -> tuple[ChannelRecord, BotRecord] | None:
        row = self._conn().execute(CHANNEL_BOT_SELECT, (agent_id, channel_name)).fetchone()
        return None if row is None else (channel_row(row[:6]), BotRecord(*row[6:]))

    # -- messages (hot path) ----------------------------------------------------------------

    def write_round(
        self, incoming: Sequence[Sequence[IncomingMessage]], results: Iterable[MessageResult],
        answers: Sequence[Answer | None] = (), before_commit: Callable[[], object] | None = None,
    ) -> list[list[IntakeResult]]:
        rows = [result_params(r) for r in results]
        if not rows and not any(incoming):
            return [[] for _ in incoming]
        answers = answers or [None] * len(incoming)
        with self._write() as conn:
            if rows:
                conn.executemany(RECORD_RESULT, rows)
            stored = [self._store_group(conn, group, answer) if group else []
                      for group, answer in zip(incoming, answers, strict=True)]
            if before_commit is not None:
                before_commit()  # (HubStore.write_round)
            return stored

    @staticmethod
    def _store_group(conn: sqlite3.Connection, messages: Sequence[IncomingMessage],
                     answer: Answer | None) -> list[IntakeResult]:
        """Look up first, then write: under BEGIN IMMEDIATE no other writer can store one of these
        callbacks meanwhile, so ``answer`` is asked only for messages that really need their bot."""
        known = _known_callbacks(conn, wanted_callbacks(messages))
        inserts, resends, answered, results = plan_group(messages, known, answer)
        conn.executemany(INSERT_MESSAGE, inserts)
        if resends:
            conn.executemany(COUNT_RESEND, resends)
        if answered:
            conn.executemany(RECORD_RESULT, answered)
        return results

    # -- messages (queries) -----------------------------------------------------------------

    def query_messages(self, query: MessageQuery) -> MessagePage:
        check_query_range(query)
        limit = max(1, min(query.limit, MAX_PAGE))
        where, params = message_filters(query)
        columns = MESSAGE_COLUMNS.format(body="body" if query.include_body else "NULL")
        rows = self._conn().execute(
            f"SELECT {columns} FROM messages WHERE {' AND '.join(where)} ORDER BY id LIMIT ?", (*params, limit + 1),
        ).fetchall()
        records = tuple(message_row(r) for r in rows[:limit])
        return MessagePage(records, records[-1].id if len(rows) > limit else None)

    def get_message(self, callback: str) -> MessageRecord:
        row = self._conn().execute(
            f"SELECT {MESSAGE_COLUMNS.format(body='body')} FROM messages WHERE callback = ?", (callback,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no message with callback {callback!r}")
        return message_row(row)

    # -- retention ----------------------------------------------------------------------------

    def message_channels(self) -> list[str]:
        """Every channel name that has stored messages (an index skip-scan: one seek per name)."""
        return [r[0] for r in self._conn().execute(MESSAGE_CHANNELS).fetchall()]

    def purge_bodies(self, channel: str, received_before: int, limit: int) -> int:
        with self._write() as conn:
            return conn.execute(PURGE_BODIES, purge_params(channel, received_before, limit)).rowcount

    def delete_messages(self, channel: str, received_before: int, limit: int) -> int:
        with self._write() as conn:
            return conn.execute(DELETE_EXPIRED, delete_params(channel, received_before, limit)).rowcount

    def delete_oldest_messages(self, limit: int) -> int:
        with self._write() as conn:
            return conn.execute(DELETE_OLDEST, (limit,)).rowcount

    def live_bytes(self) -> int:
        """Bytes of hub.sqlite3 holding data (its size less the free pages SQLite will reuse)."""
        conn = self._conn()
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages) * int(conn.execute("PRAGMA page_size").fetchone()[0])

    def free_page_bytes(self) -> int:
        """Bytes of free pages inside hub.sqlite3 (room for new rows without growing the file)."""
        conn = self._conn()
        return int(conn.execute("PRAGMA freelist_count").fetchone()[0]) * int(conn.execute("PRAGMA page_size").fetchone()[0])

    # -- resources --------------------------------------------------------------------------

    def upsert_resource(self, resource_type: str, identifier: str, resource: dict[str, Any]) -> ResourceRecord:
        stamp = now_ms()
        with self._write() as conn:
            row = conn.execute(
                "SELECT id FROM resources WHERE resource_type = ? AND identifier = ?", (resource_type, identifier)
            ).fetchone()
            resource_id = row[0] if row else str(uuid.uuid4())
            stored = {**resource, "resourceType": resource_type, "id": resource_id}
            conn.execute(
                "INSERT INTO resources (resource_type, id, identifier, resource, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (resource_type, id) DO UPDATE SET resource = excluded.resource,"
                " updated_at = excluded.updated_at",
                (resource_type, resource_id, identifier, orjson.dumps(stored).decode(), stamp),
            )
        return ResourceRecord(resource_type, resource_id, identifier, stored, stamp)

    def get_resource(self, resource_type: str, resource_id: str) -> ResourceRecord:
        row = self._conn().execute(
            RESOURCE_SELECT + " WHERE resource_type = ? AND id = ?", (resource_type, resource_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"no {resource_type} with id {resource_id!r}")
        return resource_row(row)

    def find_resources(self, resource_type: str, identifier: str | None = None, limit: int = 100) -> list[ResourceRecord]:
        sql = RESOURCE_SELECT + " WHERE resource_type = ?"
        params: list[Any] = [resource_type]
        if identifier is not None:
            sql += " AND identifier = ?"
            params.append(identifier)
        rows = self._conn().execute(sql + " ORDER BY id LIMIT ?", (*params, max(1, min(limit, MAX_PAGE)))).fetchall()
        return [resource_row(r) for r in rows]

    # -- bulk copy ----------------------------------------------------------------------------

    def count_rows(self, table: str) -> int:
        if table not in TABLE_COLUMNS:
            raise InvalidValue(f"unknown table {table!r}")
        return int(self._conn().execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def export_page(self, table: str, after: tuple[Any, ...] | None, batch: int) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._conn().execute(export_sql(table, after), (*(after or ()), batch))]

    def import_rows(self, table: str, rows: Sequence[tuple[Any, ...]]) -> int:
        with self._write() as conn:
            before = conn.total_changes
            conn.executemany(import_sql(table), rows)
            return conn.total_changes - before


def _known_callbacks(conn: sqlite3.Connection, callbacks: set[str]) -> dict[str, StoredReply | None]:
    """Stored callbacks among ``callbacks``, each with its stored reply (``None`` if unanswered)."""
    known: dict[str, StoredReply | None] = {}
    ordered = list(callbacks)
    for start in range(0, len(ordered), LOOKUP_CHUNK):
        chunk = ordered[start : start + LOOKUP_CHUNK]
        rows = conn.execute(
            "SELECT callback, reply_body, reply_content_type, reply_status FROM messages"
            f" WHERE callback IN ({','.join('?' * len(chunk))})",
            chunk,
        )
        for callback, body, content_type, status in rows:
            known[callback] = None if body is None else StoredReply(body, content_type, status)
    return known


def _threaded(name: str) -> Callable[..., Any]:
    """An async method that runs ``SqliteCore.<name>`` on the store's read/admin thread pool."""

    async def method(self: SqliteHubStore, *args: Any, **kwargs: Any) -> Any:
        return await self._run(getattr(self.core, name), *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = getattr(SqliteCore, name).__doc__
    return method


def _on_writer(name: str) -> Callable[..., Any]:
    """An async method that runs ``SqliteCore.<name>`` where the hot-path rounds run (inline on
    the event loop thread, or the writer thread): retention's steps, so they and the group
    commit never wait on each other for SQLite's write lock (each step is bounded, see
    medagent.hub.retention)."""

    async def method(self: SqliteHubStore, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.core, name)
        if self._writer is not None:
            return await asyncio.get_running_loop().run_in_executor(self._writer, lambda: fn(*args, **kwargs))
        return fn(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = getattr(SqliteCore, name).__doc__
    return method


class SqliteHubStore(HubStore):
    """The async face of :class:`SqliteCore` (reads and admin writes on threads)."""

    def __init__(self, data_dir: Path, file_name: str = DB_FILE, *, writer_thread: bool = False) -> None:
        self.core = SqliteCore(data_dir, file_name)
        self.path = self.core.path
        self.url = f"sqlite://{self.path.resolve()}"
        self._pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="medagent-hub-store")
        self._writer_thread = writer_thread
        self._writer: ThreadPoolExecutor | None = None
        self._checkpointer: WalCheckpointer | None = None

    @property  # type: ignore[override]
    def config_generation(self) -> int:
        return self.core.config_generation

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def close(self) -> None:
        await self.stop_hot_path()
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        self.core.close()

    async def start_hot_path(self) -> None:
        if self._checkpointer is not None:
            return
        if self._writer_thread:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medagent-hub-writer")
            await asyncio.get_running_loop().run_in_executor(self._writer, self.core.disable_autocheckpoint)
        else:
            self.core.disable_autocheckpoint()  # the loop thread's connection: the writer's
        self._checkpointer = WalCheckpointer(self.path, writer_gate=self.core.writer_gate)
        self._checkpointer.start()

    async def stop_hot_path(self) -> None:
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            await asyncio.to_thread(checkpointer.stop)
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    async def write_round(
        self, incoming: Sequence[Sequence[IncomingMessage]], results: Iterable[MessageResult],
        answers: Sequence[Answer | None] = (), before_commit: Callable[[], None] | None = None,
    ) -> list[list[IntakeResult]]:
        if self._writer is not None:  # (the answers then run on the writer thread)
            loop = asyncio.get_running_loop()
            on_loop: Callable[[], object] | None = (
                None if before_commit is None else functools.partial(loop.call_soon_threadsafe, before_commit))
            return await loop.run_in_executor(
                self._writer, self.core.write_round, incoming, list(results), answers, on_loop)
        return self.core.write_round(incoming, results, answers, before_commit)

    async def export_rows(self, table: str, batch: int) -> AsyncIterator[list[tuple[Any, ...]]]:  # type: ignore[override]
        after: tuple[Any, ...] | None = None
        while True:
            rows = await self._run(self.core.export_page, table, after, batch)
            if not rows:
                return
            yield rows
            after = row_key(table, rows[-1])

    add_agent = _threaded("add_agent")
    reset_client_secret = _threaded("reset_client_secret")
    get_agent = _threaded("get_agent")
    find_agent = _threaded("find_agent")
    list_agents = _threaded("list_agents")
    client_secret_hash = _threaded("client_secret_hash")
    token_generation = _threaded("token_generation")
    shared_secret = _threaded("shared_secret")
    set_upgrade_status = _threaded("set_upgrade_status")
    upgrade_status = _threaded("upgrade_status")
    revoke_tokens = _threaded("revoke_tokens")
    set_agent_status = _threaded("set_agent_status")
    set_agent_settings = _threaded("set_agent_settings")
    ensure_bot = _threaded("ensure_bot")
    get_bot = _threaded("get_bot")
    add_channel = _threaded("add_channel")
    update_channel = _threaded("update_channel")
    remove_channel = _threaded("remove_channel")
    get_channel = _threaded("get_channel")
    list_channels = _threaded("list_channels")
    channel_bot = _threaded("channel_bot")
    query_messages = _threaded("query_messages")
    get_message = _threaded("get_message")
    message_channels = _threaded("message_channels")
    purge_bodies = _on_writer("purge_bodies")
    delete_messages = _on_writer("delete_messages")
    delete_oldest_messages = _on_writer("delete_oldest_messages")
    live_bytes = _threaded("live_bytes")
    free_page_bytes = _threaded("free_page_bytes")
    upsert_resource = _threaded("upsert_resource")
    get_resource = _threaded("get_resource")
    find_resources = _threaded("find_resources")
    count_rows = _threaded("count_rows")
    import_rows = _threaded("import_rows")
