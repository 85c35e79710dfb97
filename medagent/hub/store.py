"""The hub's durable store: agents, channels, bots, inbound messages and bot-made resources.

Theory of operation
-------------------
One SQLite database, ``<data_dir>/hub.sqlite3``, in WAL mode (readers never block the writer),
``synchronous=NORMAL`` (a commit survives a process crash; the last commits may be lost on
power loss) and a 5 s busy timeout, so a CLI command may write beside a running hub. The
schema is versioned and migrated forward only (:mod:`medagent.hub.schema`).

Each thread gets its own connection (``threading.local``), so every method may be called from
any thread: the event loop reads, the hub's writer thread stores messages, bot threads upsert
resources. Connections run in autocommit mode and every write is an explicit
``BEGIN IMMEDIATE … COMMIT``.

Hot path: :meth:`HubStore.store_incoming` stores *all* messages of an ``agent:batch`` frame (or
everything a connection received meanwhile) in one transaction — one lookup of the callbacks
already known, one ``executemany`` insert, one ``executemany`` update of duplicate counters —
and :meth:`HubStore.record_results` writes the replies of many messages in one transaction.

Invariants
----------
* ``callback`` is UNIQUE: a message is stored at most once; a resend increments ``duplicate``
  on the stored row and returns the stored reply instead of a new row.
* A message row exists before its bot runs and before the agent gets ``agent:batch:ack``.
* Message queries are keyset-paginated by id and never return more than 1000 rows.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from medagent.hub.auth import hash_secret, new_client_secret
from medagent.hub.records import (
    AgentCredentials,
    AgentRecord,
    AgentStatus,
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
    MessageStatus,
    ResourceRecord,
    StoredReply,
)
from medagent.hub.schema import migrate
from medagent.storage.files import ensure_private_dir, prepare_private_database

__all__ = [
    "CHANNEL_SCHEMES",
    "DB_FILE",
    "DEFAULT_BOT",
    "MAX_PAGE",
    "HubStore",
    "InvalidValue",
    "NotFound",
    "StoreError",
    "now_ms",
]

DB_FILE = "hub.sqlite3"
MAX_PAGE = 1000
DEFAULT_BOT = "medagent.hub.bots.ack:handler"
#: address schemes a channel may use (DESIGN.md "Protocol and compatibility"; the channel kinds
#: registered in medagent.channels: serial ports are serial:// and astm+serial://)
CHANNEL_SCHEMES = ("mllp", "dicom", "astm", "tcp", "serial", "astm+serial")
_LOOKUP_CHUNK = 500
_SQLITE_INT_MAX = 2**63 - 1


class StoreError(ValueError):
    """A store request that cannot be done as asked (the message says what to change)."""


class NotFound(StoreError):
    """The agent, channel, bot or resource named does not exist."""


class InvalidValue(StoreError):
    """A value that can never be stored (empty name, malformed address or bot name)."""


def now_ms() -> int:
    return int(time.time() * 1000)


class HubStore:
    """SQLite-backed store of the hub; safe to use from several threads."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = ensure_private_dir(data_dir)  # 0700: message bodies are patient data
        self.path = self.data_dir / DB_FILE
        prepare_private_database(self.path)  # 0600, and SQLite gives -wal/-shm the same mode
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        #: Bumped by every agent/channel change made through this store, so in-process caches
        #: of agent status and channel bots (intake) see the change at once.
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
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def disable_autocheckpoint(self) -> None:
        """This thread's connection leaves WAL checkpoints to a WalCheckpointer (see writer.py)."""
        self._conn().execute("PRAGMA wal_autocheckpoint=0")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

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
        """Register an agent; the returned ``client_secret`` is not stored in clear anywhere."""
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
        """Issue a new client secret for an agent (the old one stops working); shown once."""
        agent = self.get_agent(agent_id)
        secret = new_client_secret()
        self._update_agent(agent_id, "secret_hash", hash_secret(secret), revoke=True)
        return AgentCredentials(agent.id, agent.client_id, secret)

    def get_agent(self, agent_id: str) -> AgentRecord:
        row = self._conn().execute(_AGENT_SELECT + " WHERE id = ?", (agent_id,)).fetchone()
        if row is None:
            raise NotFound(f"no agent with id {agent_id!r}")
        return _agent(row)

    def find_agent(self, id_or_name: str) -> AgentRecord:
        """The agent whose id or (else) name is ``id_or_name``."""
        row = self._conn().execute(
            _AGENT_SELECT + " WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1",
            (id_or_name, id_or_name, id_or_name),
        ).fetchone()
        if row is None:
            raise NotFound(f"no agent with id or name {id_or_name!r}")
        return _agent(row)

    def list_agents(self, name: str | None = None) -> list[AgentRecord]:
        if name is None:
            rows = self._conn().execute(_AGENT_SELECT + " ORDER BY name").fetchall()
        else:
            rows = self._conn().execute(_AGENT_SELECT + " WHERE name = ?", (name,)).fetchall()
        return [_agent(r) for r in rows]

    def client_secret_hash(self, client_id: str) -> tuple[str, str, int] | None:
        """``(agent_id, secret_hash, token_generation)`` of a client id, for the token endpoint."""
        row = self._conn().execute(
            "SELECT id, secret_hash, token_generation FROM agents WHERE client_id = ?", (client_id,)
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def token_generation(self, agent_id: str) -> int | None:
        """The agent's current token generation (tokens of another one are revoked); None: no agent."""
        row = self._conn().execute("SELECT token_generation FROM agents WHERE id = ?", (agent_id,)).fetchone()
        return None if row is None else int(row[0])

    def revoke_tokens(self, agent_id: str) -> int:
        """Refuse every access token issued to the agent so far; returns the new generation."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE agents SET token_generation = token_generation + 1, updated_at = ? WHERE id = ?",
                (now_ms(), agent_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no agent with id {agent_id!r}")
            return int(conn.execute("SELECT token_generation FROM agents WHERE id = ?", (agent_id,)).fetchone()[0])

    def set_agent_status(self, agent_id: str, status: AgentStatus) -> None:
        """Set ``Agent.status``; turning an agent ``off`` also revokes its tokens."""
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
        """The bot running ``callable_spec`` ("module:function"), created on first use."""
        module, sep, function = callable_spec.partition(":")
        if not sep or not module or not function:
            raise InvalidValue(f"a bot must be named 'module:function', not {callable_spec!r}")
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
        """Add a channel (an ``Endpoint`` of the agent) whose messages go to ``bot``."""
        self.config_generation += 1
        if not name.strip():
            raise InvalidValue("a channel name must not be empty")
        _check_address(address)
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
        """Change a channel's address, bot or status (``None`` keeps the current value)."""
        self.config_generation += 1
        current = self.get_channel(channel_id)
        if address is not None:
            _check_address(address)
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
        """Delete a channel; its stored messages stay."""
        self.config_generation += 1
        with self._write() as conn:
            cur = conn.execute("DELETE FROM channels WHERE id = ?", (channel_id,))
        if cur.rowcount == 0:
            raise NotFound(f"no channel (Endpoint) with id {channel_id!r}")

    def get_channel(self, channel_id: str) -> ChannelRecord:
        row = self._conn().execute(_CHANNEL_SELECT + " WHERE id = ?", (channel_id,)).fetchone()
        if row is None:
            raise NotFound(f"no channel (Endpoint) with id {channel_id!r}")
        return _channel(row)

    def list_channels(self, agent_id: str) -> list[ChannelRecord]:
        rows = self._conn().execute(_CHANNEL_SELECT + " WHERE agent_id = ? ORDER BY name", (agent_id,)).fetchall()
        return [_channel(r) for r in rows]

    def channel_bot(self, agent_id: str, channel_name: str) -> tuple[ChannelRecord, BotRecord] | None:
        """The channel of an agent by name and its bot, or ``None``."""
        row = self._conn().execute(
            "SELECT c.id, c.agent_id, c.name, c.address, c.bot_id, c.status, b.id, b.name, b.callable"
            " FROM channels c JOIN bots b ON b.id = c.bot_id WHERE c.agent_id = ? AND c.name = ?",
            (agent_id, channel_name),
        ).fetchone()
        return None if row is None else (_channel(row[:6]), BotRecord(*row[6:]))

    # -- messages (hot path) ----------------------------------------------------------------

    def store_incoming(self, messages: Sequence[IncomingMessage]) -> list[IntakeResult]:
        """Store many inbound messages in one transaction; one result per message, in order."""
        return self.write_round([messages], ())[0]

    def record_results(self, results: Iterable[MessageResult]) -> None:
        """Write the replies and statuses of many processed messages in one transaction."""
        self.write_round((), results)

    def write_round(
        self, incoming: Sequence[Sequence[IncomingMessage]], results: Iterable[MessageResult]
    ) -> list[list[IntakeResult]]:
        """Both hot-path writes of one loop round in ONE transaction: first the replies of
        processed messages, then each group of inbound messages (so a resend in a group already
        sees a reply recorded in the same round). Returns the intake results per group."""
        rows = [_result_row(r) for r in results]
        if not rows and not any(incoming):
            return [[] for _ in incoming]
        with self._write() as conn:
            if rows:
                conn.executemany(_RECORD_RESULT, rows)
            return [self._store_group(conn, group) if group else [] for group in incoming]

    @staticmethod
    def _store_group(conn: sqlite3.Connection, messages: Sequence[IncomingMessage]) -> list[IntakeResult]:
        wanted = {m.callback for m in messages} | {m.duplicate_of for m in messages if m.duplicate_of}
        known = _known_callbacks(conn, wanted)
        inserts: list[tuple[Any, ...]] = []
        resends: list[tuple[str]] = []
        results: list[IntakeResult] = []
        for m in messages:
            if m.callback in known:
                resends.append((m.callback,))
                results.append(IntakeResult(IntakeKind.DUPLICATE, known[m.callback]))
                continue
            original_known = m.duplicate_of is not None and m.duplicate_of in known
            inserts.append(_insert_row(m, 1 if original_known else 0, m.duplicate_of if original_known else None))
            known[m.callback] = None
            if original_known:
                results.append(IntakeResult(IntakeKind.DUPLICATE, known[m.duplicate_of]))  # type: ignore[index]
            else:
                results.append(IntakeResult(IntakeKind.NEW))
        conn.executemany(_INSERT_MESSAGE, inserts)
        conn.executemany("UPDATE messages SET duplicate = duplicate + 1 WHERE callback = ?", resends)
        return results

    # -- messages (queries) -----------------------------------------------------------------

    def query_messages(self, query: MessageQuery) -> MessagePage:
        """One keyset page of messages matching ``query``, oldest first.

        Raises :class:`InvalidValue` for a cursor or instant SQLite cannot hold (a signed 64-bit
        integer), instead of the OverflowError sqlite3 would raise while binding it.
        """
        for name, value in (("after_id", query.after_id), ("since", query.since), ("until", query.until)):
            if value is not None and not 0 <= value <= _SQLITE_INT_MAX:
                raise InvalidValue(f"{name} is out of range (0 to {_SQLITE_INT_MAX}), not {value}")
        limit = max(1, min(query.limit, MAX_PAGE))
        where, params = _message_filters(query)
        body = "body" if query.include_body else "NULL"
        rows = self._conn().execute(
            f"SELECT id, agent_id, channel, remote, callback, control_id, message_type, content_type, {body},"
            " length(body), received_at, status, reply_body, reply_content_type, reply_status, error,"
            " duplicate, duplicate_of, processed_at FROM messages"
            f" WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        records = tuple(_message(r) for r in rows[:limit])
        return MessagePage(records, records[-1].id if len(rows) > limit else None)

    def get_message(self, callback: str) -> MessageRecord:
        page = self._conn().execute(
            "SELECT id, agent_id, channel, remote, callback, control_id, message_type, content_type, body,"
            " length(body), received_at, status, reply_body, reply_content_type, reply_status, error,"
            " duplicate, duplicate_of, processed_at FROM messages WHERE callback = ?",
            (callback,),
        ).fetchone()
        if page is None:
            raise NotFound(f"no message with callback {callback!r}")
        return _message(page)

    # -- retention (medagent.hub.retention; each call is one short transaction) -----------------

    def message_channels(self) -> list[str]:
        """Every channel name that has stored messages (an index skip-scan: one seek per name)."""
        rows = self._conn().execute(
            "WITH RECURSIVE c(name) AS (SELECT min(channel) FROM messages UNION ALL"
            " SELECT (SELECT min(channel) FROM messages WHERE channel > c.name) FROM c WHERE c.name IS NOT NULL)"
            " SELECT name FROM c WHERE name IS NOT NULL"
        ).fetchall()
        return [r[0] for r in rows]

    def purge_bodies(self, channel: str, received_before: int, limit: int) -> int:
        """Blank the message and reply bodies of up to ``limit`` of the channel's oldest messages
        received before ``received_before`` (epoch ms); the metadata stays. Returns the count."""
        with self._write() as conn:
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM messages INDEXED BY messages_channel_body_age WHERE channel = ?"
                " AND received_at < ? AND body_purged_at IS NULL ORDER BY received_at LIMIT ?",
                (channel, received_before, limit),
            )]
            return self._purge_ids(conn, ids)

    @staticmethod
    def _purge_ids(conn: sqlite3.Connection, ids: list[int]) -> int:
        stamp = now_ms()
        conn.executemany(
            "UPDATE messages SET body = '', reply_body = NULL, body_purged_at = ? WHERE id = ?",
            [(stamp, i) for i in ids],
        )
        return len(ids)

    def delete_messages(self, channel: str, received_before: int, limit: int) -> int:
        """Delete up to ``limit`` of the channel's oldest messages received before ``received_before``."""
        with self._write() as conn:
            return conn.execute(
                "DELETE FROM messages WHERE id IN (SELECT id FROM messages INDEXED BY messages_channel_age"
                " WHERE channel = ? AND received_at < ? ORDER BY received_at LIMIT ?)",
                (channel, received_before, limit),
            ).rowcount

    def delete_oldest_messages(self, limit: int) -> int:
        """Delete the ``limit`` messages with the lowest ids (the oldest stored), all channels."""
        with self._write() as conn:
            return conn.execute(
                "DELETE FROM messages WHERE id IN (SELECT id FROM messages ORDER BY id LIMIT ?)", (limit,)
            ).rowcount

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
        """Insert or replace the resource keyed by (type, identifier); its id is kept on update."""
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
            "SELECT resource_type, id, identifier, resource, updated_at FROM resources"
            " WHERE resource_type = ? AND id = ?",
            (resource_type, resource_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"no {resource_type} with id {resource_id!r}")
        return _resource(row)

    def find_resources(self, resource_type: str, identifier: str | None = None, limit: int = 100) -> list[ResourceRecord]:
        sql = "SELECT resource_type, id, identifier, resource, updated_at FROM resources WHERE resource_type = ?"
        params: list[Any] = [resource_type]
        if identifier is not None:
            sql += " AND identifier = ?"
            params.append(identifier)
        rows = self._conn().execute(sql + " ORDER BY id LIMIT ?", (*params, max(1, min(limit, MAX_PAGE)))).fetchall()
        return [_resource(r) for r in rows]


# -- row helpers ----------------------------------------------------------------------------

_AGENT_SELECT = "SELECT id, name, status, client_id, settings, created_at, updated_at FROM agents"
_CHANNEL_SELECT = "SELECT id, agent_id, name, address, bot_id, status FROM channels"
_INSERT_MESSAGE = (
    "INSERT INTO messages (agent_id, channel, remote, callback, control_id, message_type, content_type,"
    " body, received_at, duplicate, duplicate_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _check_address(address: str) -> None:
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in CHANNEL_SCHEMES or not rest:
        raise InvalidValue(
            f"a channel address must be a URL with scheme {', '.join(CHANNEL_SCHEMES)}"
            f" (e.g. mllp://0.0.0.0:2575), not {address!r}"
        )


def _agent(row: Sequence[Any]) -> AgentRecord:
    return AgentRecord(row[0], row[1], AgentStatus(row[2]), row[3], orjson.loads(row[4]), row[5], row[6])


def _channel(row: Sequence[Any]) -> ChannelRecord:
    return ChannelRecord(row[0], row[1], row[2], row[3], row[4], ChannelStatus(row[5]))


def _resource(row: Sequence[Any]) -> ResourceRecord:
    return ResourceRecord(row[0], row[1], row[2], orjson.loads(row[3]), row[4])


def _message(row: Sequence[Any]) -> MessageRecord:
    return MessageRecord(
        id=row[0], agent_id=row[1], channel=row[2], remote=row[3], callback=row[4], control_id=row[5],
        message_type=row[6], content_type=row[7], body=row[8], body_size=row[9], received_at=row[10],
        status=MessageStatus(row[11]), reply_body=row[12], reply_content_type=row[13], reply_status=row[14],
        error=row[15], duplicate=row[16], duplicate_of=row[17], processed_at=row[18],
    )


_RECORD_RESULT = (
    "UPDATE messages SET status = ?, reply_body = ?, reply_content_type = ?, reply_status = ?,"
    " error = ?, processed_at = ? WHERE callback = ?"
)


def _result_row(r: MessageResult) -> tuple[Any, ...]:
    reply = r.reply
    return (
        r.status.value,
        None if reply is None else reply.body,
        None if reply is None else reply.content_type,
        None if reply is None else reply.status_code,
        r.error,
        r.processed_at,
        r.callback,
    )


def _insert_row(m: IncomingMessage, duplicate: int, duplicate_of: str | None) -> tuple[Any, ...]:
    return (m.agent_id, m.channel, m.remote, m.callback, m.control_id, m.message_type, m.content_type,
            m.body, m.received_at, duplicate, duplicate_of)


def _known_callbacks(conn: sqlite3.Connection, callbacks: set[str]) -> dict[str, StoredReply | None]:
    """Stored callbacks among ``callbacks``, each with its stored reply (``None`` if unanswered)."""
    known: dict[str, StoredReply | None] = {}
    ordered = list(callbacks)
    for start in range(0, len(ordered), _LOOKUP_CHUNK):
        chunk = ordered[start : start + _LOOKUP_CHUNK]
        rows = conn.execute(
            "SELECT callback, reply_body, reply_content_type, reply_status FROM messages"
            f" WHERE callback IN ({','.join('?' * len(chunk))})",
            chunk,
        )
        for callback, body, content_type, status in rows:
            known[callback] = None if body is None else StoredReply(body, content_type, status)
    return known


def _message_filters(q: MessageQuery) -> tuple[list[str], list[Any]]:
    where, params = ["id > ?"], [q.after_id]
    for column, value in (("agent_id", q.agent_id), ("channel", q.channel), ("control_id", q.control_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if q.message_type is not None:
        where.append("(message_type = ? OR message_type LIKE ? ESCAPE '\\')")
        escaped = q.message_type.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        params += [q.message_type, escaped + "^%"]
    if q.since is not None:
        where.append("received_at >= ?")
        params.append(q.since)
    if q.until is not None:
        where.append("received_at < ?")
        params.append(q.until)
    if q.status is not None:
        where.append("status = ?")
        params.append(MessageStatus(q.status).value)
    return where, params
