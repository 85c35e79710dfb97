"""The hub store on each engine (a real SQLite file, a real PostgreSQL): schema, intake
deduplication, paging and filters."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from medagent.hub.records import (
    IncomingMessage,
    IntakeKind,
    MessageQuery,
    MessageResult,
    MessageStatus,
    StoredReply,
)
from medagent.hub.schema import SCHEMA_VERSION, SchemaError
from medagent.hub.store import DB_FILE, HubStore, InvalidValue, NotFound, StoreError
from medagent.hub.store.sqlite import SqliteCore
from medagent.storage.checkpoint import WAL_SIZE_LIMIT_BYTES


def incoming(agent_id: str, i: int, channel: str = "adt", message_type: str = "ADT^A01",
             received_at: int = 1_000, **extra: object) -> IncomingMessage:
    return IncomingMessage(agent_id=agent_id, channel=channel, remote="r", callback=f"cb-{i}",
                           content_type="x-application/hl7-v2+er7", body=f"MSH|{i}", received_at=received_at,
                           control_id=f"C{i}", message_type=message_type, **extra)  # type: ignore[arg-type]


def test_schema_is_versioned_and_wal(tmp_path: Path) -> None:
    SqliteCore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / DB_FILE)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / DB_FILE)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaError, match="newer"):
        SqliteCore(tmp_path)


async def test_agents_and_channels(store: HubStore) -> None:
    credentials = await store.add_agent("lab")
    with pytest.raises(StoreError, match="already exists"):
        await store.add_agent("lab")
    with pytest.raises(InvalidValue):
        await store.add_agent("  ")
    assert (await store.find_agent("lab")).id == credentials.agent_id
    assert (await store.find_agent(credentials.agent_id)).name == "lab"
    channel = await store.add_channel(credentials.agent_id, "adt", "mllp://0.0.0.0:2575")
    with pytest.raises(StoreError, match="already has a channel"):
        await store.add_channel(credentials.agent_id, "adt", "mllp://0.0.0.0:2576")
    with pytest.raises(InvalidValue, match="scheme"):
        await store.add_channel(credentials.agent_id, "web", "http://x")
    with pytest.raises(InvalidValue, match="module:function"):
        await store.add_channel(credentials.agent_id, "b", "mllp://0.0.0.0:1", bot="nocolon")
    with pytest.raises(NotFound):
        await store.add_channel("nope", "c", "mllp://0.0.0.0:1")
    found = await store.channel_bot(credentials.agent_id, "adt")
    assert found is not None and found[0] == channel and found[1].callable == "medagent.hub.bots.ack:handler"
    assert await store.channel_bot(credentials.agent_id, "missing") is None


async def test_intake_deduplicates_by_callback(store: HubStore) -> None:
    messages = [incoming("a", i) for i in range(5)]
    assert [r.kind for r in await store.store_incoming(messages)] == [IntakeKind.NEW] * 5
    await store.record_results([MessageResult("cb-1", MessageStatus.PROCESSED, StoredReply("ACK", "x", 200), None, 2_000)])
    again = await store.store_incoming([incoming("a", 1), incoming("a", 2), incoming("a", 9), incoming("a", 9)])
    assert again[0].kind is IntakeKind.DUPLICATE and again[0].reply == StoredReply("ACK", "x", 200)
    assert again[1].kind is IntakeKind.DUPLICATE and again[1].reply is None  # stored, never answered
    assert [r.kind for r in again[2:]] == [IntakeKind.NEW, IntakeKind.DUPLICATE]
    assert (await store.get_message("cb-1")).duplicate == 1
    assert (await store.get_message("cb-9")).duplicate == 1
    copy = await store.store_incoming([incoming("a", 10, duplicate_of="cb-1")])
    assert copy[0].kind is IntakeKind.DUPLICATE and copy[0].reply == StoredReply("ACK", "x", 200)
    assert (await store.get_message("cb-10")).duplicate_of == "cb-1"


async def test_a_round_answer_is_asked_only_for_messages_that_need_their_bot(store: HubStore) -> None:
    """The round's Answer: a new message is inserted with its result (one write); a resend of an
    answered message, a flagged copy of a stored one and a repeat inside the group are not asked;
    a resend of a message stored without a reply is, and its result is written in the round."""
    await store.store_incoming([incoming("a", 1), incoming("a", 2)])
    await store.record_results([MessageResult("cb-1", MessageStatus.PROCESSED, StoredReply("ACK", "x", 200), None, 2_000)])
    group = [incoming("a", 1), incoming("a", 2), incoming("a", 3), incoming("a", 3), incoming("a", 4, duplicate_of="cb-1"),
             incoming("a", 5)]
    asked: list[str] = []

    def answer(i: int) -> MessageResult | None:
        asked.append(group[i].callback)
        if group[i].callback == "cb-5":
            return None  # left to a bot outside the round
        return MessageResult(group[i].callback, MessageStatus.PROCESSED, StoredReply(f"R{i}", "x", 200), None, 3_000)

    results = await store.store_incoming(group, answer)
    assert asked == ["cb-2", "cb-3", "cb-5"]
    assert [(r.kind, r.reply and r.reply.body) for r in results] == [
        (IntakeKind.DUPLICATE, "ACK"), (IntakeKind.DUPLICATE, "R1"), (IntakeKind.NEW, "R2"), (IntakeKind.DUPLICATE, "R2"),
        (IntakeKind.DUPLICATE, "ACK"), (IntakeKind.NEW, None)]
    for callback, body, duplicate in (("cb-2", "R1", 1), ("cb-3", "R2", 1)):
        record = await store.get_message(callback)
        assert (record.status, record.reply_body, record.processed_at, record.duplicate) == (
            MessageStatus.PROCESSED, body, 3_000, duplicate)
    for callback in ("cb-4", "cb-5"):
        record = await store.get_message(callback)
        assert (record.status, record.reply_body, record.processed_at) == (MessageStatus.RECEIVED, None, None)


async def test_keyset_paging_and_filters(store: HubStore) -> None:
    await store.store_incoming([incoming("a", i, received_at=1_000 + i) for i in range(25)])
    await store.store_incoming([incoming("b", 100 + i, channel="lab", message_type="ORU^R01") for i in range(5)])
    seen: list[str] = []
    after = 0
    for _ in range(10):
        page = await store.query_messages(MessageQuery(agent_id="a", after_id=after, limit=10))
        seen += [m.callback for m in page.messages]
        if page.next_after_id is None:
            break
        after = page.next_after_id
    assert seen == [f"cb-{i}" for i in range(25)]
    assert all(m.body is None for m in page.messages)
    assert (await store.query_messages(MessageQuery(include_body=True, limit=1))).messages[0].body == "MSH|0"
    assert len((await store.query_messages(MessageQuery(message_type="ORU"))).messages) == 5
    assert len((await store.query_messages(MessageQuery(message_type="ADT^A01"))).messages) == 25
    assert len((await store.query_messages(MessageQuery(message_type="ADT^A0"))).messages) == 0
    assert len((await store.query_messages(MessageQuery(channel="lab", agent_id="b"))).messages) == 5
    assert [m.callback for m in (await store.query_messages(MessageQuery(control_id="C7"))).messages] == ["cb-7"]
    assert len((await store.query_messages(MessageQuery(agent_id="a", since=1_010, until=1_015))).messages) == 5
    assert len((await store.query_messages(MessageQuery(status=MessageStatus.RECEIVED, limit=5000))).messages) == 30


async def test_resources_upsert_by_identifier(store: HubStore) -> None:
    first = await store.upsert_resource("Patient", "sys|1", {"gender": "male"})
    second = await store.upsert_resource("Patient", "sys|1", {"gender": "female"})
    assert first.id == second.id
    assert (await store.get_resource("Patient", first.id)).resource == {"gender": "female", "resourceType": "Patient",
                                                                "id": first.id}
    assert [r.id for r in await store.find_resources("Patient", "sys|1")] == [first.id]
    with pytest.raises(NotFound):
        await store.get_resource("Patient", "nope")


async def test_channel_update_remove_and_secret_reset(store: HubStore) -> None:
    from medagent.hub.auth import verify_secret
    from medagent.hub.records import ChannelStatus

    credentials = await store.add_agent("lab")
    channel = await store.add_channel(credentials.agent_id, "adt", "mllp://0.0.0.0:2575")
    updated = await store.update_channel(channel.id, address="mllp://0.0.0.0:2600", bot="hubtest_bots:silent")
    assert await store.get_channel(channel.id) == updated
    assert updated.address == "mllp://0.0.0.0:2600" and (await store.get_bot(updated.bot_id)).callable == "hubtest_bots:silent"
    assert (await store.update_channel(channel.id, status=ChannelStatus.OFF)).status is ChannelStatus.OFF
    with pytest.raises(InvalidValue):
        await store.update_channel(channel.id, address="ftp://x")
    await store.remove_channel(channel.id)
    assert await store.list_channels(credentials.agent_id) == []
    with pytest.raises(NotFound):
        await store.remove_channel(channel.id)

    renewed = await store.reset_client_secret(credentials.agent_id)
    assert (renewed.agent_id, renewed.client_id) == (credentials.agent_id, credentials.client_id)
    found = await store.client_secret_hash(credentials.client_id)
    assert found is not None
    assert verify_secret(renewed.client_secret, found[1]) and not verify_secret(credentials.client_secret, found[1])


def test_every_hub_connection_caps_the_wal_file_and_keeps_temp_data_in_memory(tmp_path: Path) -> None:
    """The checkpointer only cuts the WAL file when idle, so each writer connection carries the cap
    (a long dashboard read under load must not leave a WAL of unbounded size behind); and no
    connection makes temp files (freeing one can wait for the disk's discard)."""
    import threading

    core = SqliteCore(tmp_path)
    settings: list[tuple[int, int]] = []

    def read() -> None:
        conn = core._conn()
        settings.append((conn.execute("PRAGMA journal_size_limit").fetchone()[0],
                         conn.execute("PRAGMA temp_store").fetchone()[0]))

    try:
        read()
        other = threading.Thread(target=read)
        other.start()
        other.join()
    finally:
        core.close()
    assert settings == [(WAL_SIZE_LIMIT_BYTES, 2), (WAL_SIZE_LIMIT_BYTES, 2)]  # 2: MEMORY
