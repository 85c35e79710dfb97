"""What both hub store engines share: errors, limits, channel address rules and row decoding.

Kept free of any database module, so the PostgreSQL engine and the SQLite engine decode rows
the same way and raise the same errors for the same bad input.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from medagent.hub.records import (
    AgentRecord,
    AgentStatus,
    Answer,
    ChannelRecord,
    ChannelStatus,
    IncomingMessage,
    IntakeKind,
    IntakeResult,
    MessageQuery,
    MessageRecord,
    MessageResult,
    MessageStatus,
    ResourceRecord,
    StoredReply,
)

__all__ = [
    "CHANNEL_SCHEMES",
    "DB_FILE",
    "DEFAULT_BOT",
    "INT64_MAX",
    "MAX_PAGE",
    "InvalidValue",
    "NotFound",
    "StoreError",
    "StoreUnavailable",
    "now_ms",
]

DB_FILE = "hub.sqlite3"
MAX_PAGE = 1000
DEFAULT_BOT = "medagent.hub.bots.ack:handler"
#: address schemes a channel may use (DESIGN.md "Protocol and compatibility"; the channel kinds
#: registered in medagent.channels: serial ports are serial:// and astm+serial://)
CHANNEL_SCHEMES = ("mllp", "dicom", "astm", "tcp", "serial", "astm+serial")
#: both engines keep ids and instants as signed 64-bit integers
INT64_MAX = 2**63 - 1
LOOKUP_CHUNK = 500


class StoreError(ValueError):
    """A store request that cannot be done as asked (the message says what to change)."""


class NotFound(StoreError):
    """The agent, channel, bot or resource named does not exist."""


class InvalidValue(StoreError):
    """A value that can never be stored (empty name, malformed address or bot name)."""


class StoreUnavailable(RuntimeError):
    """The store cannot be opened: bad URL, unreachable server, missing driver (says the fix)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def check_address(address: str) -> None:
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in CHANNEL_SCHEMES or not rest:
        raise InvalidValue(
            f"a channel address must be a URL with scheme {', '.join(CHANNEL_SCHEMES)}"
            f" (e.g. mllp://0.0.0.0:2575), not {address!r}"
        )


def check_bot_spec(callable_spec: str) -> None:
    module, sep, function = callable_spec.partition(":")
    if not sep or not module or not function:
        raise InvalidValue(f"a bot must be named 'module:function', not {callable_spec!r}")


def check_query_range(query: MessageQuery) -> None:
    """Refuse a cursor or instant neither engine can hold (a signed 64-bit integer)."""
    for name, value in (("after_id", query.after_id), ("since", query.since), ("until", query.until)):
        if value is not None and not 0 <= value <= INT64_MAX:
            raise InvalidValue(f"{name} is out of range (0 to {INT64_MAX}), not {value}")


# -- SQL text shared by both engines (written with ? placeholders; the PostgreSQL engine turns
# them into %s) ------------------------------------------------------------------------------

AGENT_SELECT = "SELECT id, name, status, client_id, settings, created_at, updated_at FROM agents"
CHANNEL_SELECT = "SELECT id, agent_id, name, address, bot_id, status FROM channels"
CHANNEL_BOT_SELECT = (
    "SELECT c.id, c.agent_id, c.name, c.address, c.bot_id, c.status, b.id, b.name, b.callable"
    " FROM channels c JOIN bots b ON b.id = c.bot_id WHERE c.agent_id = ? AND c.name = ?"
)
MESSAGE_COLUMNS = (
    "id, agent_id, channel, remote, callback, control_id, message_type, content_type, {body},"
    " length(body), received_at, status, reply_body, reply_content_type, reply_status, error,"
    " duplicate, duplicate_of, processed_at"
)
#: the row with its result when the round answered it (no later UPDATE of the same row)
INSERT_MESSAGE = (
    "INSERT INTO messages (agent_id, channel, remote, callback, control_id, message_type, content_type,"
    " body, received_at, duplicate, duplicate_of, status, reply_body, reply_content_type, reply_status, error,"
    " processed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: columns of INSERT_MESSAGE's parameters (:func:`insert_params`)
INSERT_WIDTH = 17
RECORD_RESULT = (
    "UPDATE messages SET status = ?, reply_body = ?, reply_content_type = ?, reply_status = ?,"
    " error = ?, processed_at = ? WHERE callback = ?"
)
COUNT_RESEND = "UPDATE messages SET duplicate = duplicate + 1 WHERE callback = ?"
#: retention's steps (schema v4's messages_retention index, keyed (channel, purged, received_at)):
#: each reads only the rows it changes. A purge seeks the channel's unpurged rows older than the
#: cutoff; a delete takes the purged ones first, then the unpurged (UNION ALL with a LIMIT stops
#: before the second half when the first gave enough).
_RETENTION_IDS = ("SELECT id FROM messages WHERE channel = ? AND (body_purged_at IS NOT NULL) = {purged}"
                  " AND received_at < ? ORDER BY received_at LIMIT ?")
PURGE_BODIES = ("UPDATE messages SET body = '', reply_body = NULL, body_purged_at = ? WHERE id IN ("
                + _RETENTION_IDS.format(purged="FALSE") + ")")
DELETE_EXPIRED = (
    "DELETE FROM messages WHERE id IN (SELECT id FROM (" + _RETENTION_IDS.format(purged="TRUE") + ") AS p"
    " UNION ALL SELECT id FROM (" + _RETENTION_IDS.format(purged="FALSE") + ") AS u LIMIT ?)"
)
DELETE_OLDEST = "DELETE FROM messages WHERE id IN (SELECT id FROM messages ORDER BY id LIMIT ?)"
#: every channel name with stored messages: a recursive skip-scan of the retention index
MESSAGE_CHANNELS = (
    "WITH RECURSIVE c(name) AS (SELECT min(channel) FROM messages UNION ALL"
    " SELECT (SELECT min(channel) FROM messages WHERE channel > c.name) FROM c WHERE c.name IS NOT NULL)"
    " SELECT name FROM c WHERE name IS NOT NULL"
)


def purge_params(channel: str, received_before: int, limit: int) -> tuple[Any, ...]:
    return (now_ms(), channel, received_before, limit)


def delete_params(channel: str, received_before: int, limit: int) -> tuple[Any, ...]:
    return (channel, received_before, limit, channel, received_before, limit, limit)


RESOURCE_SELECT = "SELECT resource_type, id, identifier, resource, updated_at FROM resources"
#: tables in dependency order (migrate-store copies them in this order)
TABLES = ("agents", "bots", "channels", "messages", "resources")


def agent_row(row: Sequence[Any]) -> AgentRecord:
    return AgentRecord(row[0], row[1], AgentStatus(row[2]), row[3], orjson.loads(row[4]), row[5], row[6])


def channel_row(row: Sequence[Any]) -> ChannelRecord:
    return ChannelRecord(row[0], row[1], row[2], row[3], row[4], ChannelStatus(row[5]))


def resource_row(row: Sequence[Any]) -> ResourceRecord:
    return ResourceRecord(row[0], row[1], row[2], orjson.loads(row[3]), row[4])


def message_row(row: Sequence[Any]) -> MessageRecord:
    return MessageRecord(
        id=row[0], agent_id=row[1], channel=row[2], remote=row[3], callback=row[4], control_id=row[5],
        message_type=row[6], content_type=row[7], body=row[8], body_size=row[9], received_at=row[10],
        status=MessageStatus(row[11]), reply_body=row[12], reply_content_type=row[13], reply_status=row[14],
        error=row[15], duplicate=row[16], duplicate_of=row[17], processed_at=row[18],
    )


def result_params(r: MessageResult) -> tuple[Any, ...]:
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


_UNANSWERED = (MessageStatus.RECEIVED.value, None, None, None, None, None)


def insert_params(m: IncomingMessage, duplicate: int, duplicate_of: str | None,
                  result: MessageResult | None = None) -> tuple[Any, ...]:
    row = (m.agent_id, m.channel, m.remote, m.callback, m.control_id, m.message_type, m.content_type,
           m.body, m.received_at, duplicate, duplicate_of)
    return row + (_UNANSWERED if result is None else result_params(result)[:6])


def wanted_callbacks(messages: Sequence[IncomingMessage]) -> set[str]:
    """Callbacks a group must look up: its own, and the originals its resends name."""
    return {m.callback for m in messages} | {m.duplicate_of for m in messages if m.duplicate_of}


def plan_group(
    messages: Sequence[IncomingMessage], known: dict[str, StoredReply | None], answer: Answer | None = None,
) -> tuple[list[tuple[Any, ...]], list[tuple[str]], list[tuple[Any, ...]], list[IntakeResult]]:
    """Decide, from the callbacks already stored (``known``, updated in place), which messages
    of a group are inserted (rows), which are counted as resends, which stored rows get their
    result now (RECORD_RESULT rows), and each message's intake result.

    A callback already stored (or seen earlier in the group) is a resend: its duplicate counter
    goes up and its stored reply is returned; when it has none, ``answer`` may give it one now
    (the hub stopped between storing it and its result). A new callback whose ``duplicate_of``
    is stored is inserted with ``duplicate = 1`` and answered with the original's reply. Any
    other new callback is inserted with the result ``answer`` gives it (if any), so a message
    answered in the round costs one row write.
    """
    inserts: list[tuple[Any, ...]] = []
    resends: list[tuple[str]] = []
    answered: list[tuple[Any, ...]] = []
    results: list[IntakeResult] = []
    for i, m in enumerate(messages):
        callback = m.callback
        if callback in known:
            resends.append((callback,))
            reply = known[callback]
            if reply is None and answer is not None and (result := answer(i)) is not None:
                answered.append(result_params(result))
                reply = known[callback] = result.reply
            results.append(IntakeResult(IntakeKind.DUPLICATE, reply))
            continue
        if m.duplicate_of is not None and m.duplicate_of in known:
            inserts.append(insert_params(m, 1, m.duplicate_of))
            known[callback] = None
            results.append(IntakeResult(IntakeKind.DUPLICATE, known[m.duplicate_of]))
            continue
        result = answer(i) if answer is not None else None
        inserts.append(insert_params(m, 0, None, result))
        reply = known[callback] = None if result is None else result.reply
        results.append(IntakeResult(IntakeKind.NEW, reply))
    return inserts, resends, answered, results


def message_filters(q: MessageQuery) -> tuple[list[str], list[Any]]:
    where: list[str] = ["id > ?"]
    params: list[Any] = [q.after_id]
    add_filters(where, params, agent_id=q.agent_id, channel=q.channel, control_id=q.control_id,
                message_type=q.message_type, since=q.since, until=q.until)
    if q.status is not None:
        where.append("status = ?")
        params.append(MessageStatus(q.status).value)
    return where, params


def add_filters(where: list[str], params: list[Any], *, agent_id: str | None, channel: str | None,
                control_id: str | None, message_type: str | None, since: int | None, until: int | None) -> None:
    """Append the message search conditions both the messages API and the dashboard accept (a
    message type matches exactly or as the prefix before ``^``; ``since`` inclusive, ``until`` not)."""
    for column, value in (("agent_id", agent_id), ("channel", channel), ("control_id", control_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if message_type is not None:
        where.append("(message_type = ? OR message_type LIKE ? ESCAPE '\\')")
        escaped = message_type.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        params += [message_type, escaped + "^%"]
    if since is not None:
        where.append("received_at >= ?")
        params.append(since)
    if until is not None:
        where.append("received_at < ?")
        params.append(until)


#: columns of each table as migrate-store copies them, and the key it pages by
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "agents": ("id", "name", "status", "client_id", "secret_hash", "settings", "created_at", "updated_at",
               "token_generation"),
    "bots": ("id", "name", "callable"),
    "channels": ("id", "agent_id", "name", "address", "bot_id", "status"),
    "messages": ("id", "agent_id", "channel", "remote", "callback", "control_id", "message_type", "content_type",
                 "body", "received_at", "status", "reply_body", "reply_content_type", "reply_status", "error",
                 "duplicate", "duplicate_of", "processed_at", "body_purged_at"),
    "resources": ("resource_type", "id", "identifier", "resource", "updated_at"),
}
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "agents": ("id",), "bots": ("id",), "channels": ("id",), "messages": ("id",), "resources": ("resource_type", "id"),
}


def export_sql(table: str, after: tuple[Any, ...] | None) -> str:
    """One keyset page of ``table`` after key ``after`` (``?`` placeholders, then the limit)."""
    if table not in TABLE_COLUMNS:
        raise InvalidValue(f"unknown table {table!r}")
    keys = TABLE_KEYS[table]
    where = "" if after is None else f" WHERE ({', '.join(keys)}) > ({', '.join('?' * len(keys))})"
    return f"SELECT {', '.join(TABLE_COLUMNS[table])} FROM {table}{where} ORDER BY {', '.join(keys)} LIMIT ?"


def import_sql(table: str) -> str:
    columns = TABLE_COLUMNS[table]
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            " ON CONFLICT DO NOTHING")


def row_key(table: str, row: Sequence[Any]) -> tuple[Any, ...]:
    columns = TABLE_COLUMNS[table]
    return tuple(row[columns.index(k)] for k in TABLE_KEYS[table])
