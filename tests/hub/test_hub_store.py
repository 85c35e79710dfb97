"""The hub store on a real SQLite file: schema, intake deduplication, paging and filters."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from medagent.hub.records import IncomingMessage, IntakeKind, MessageQuery, MessageResult, MessageStatus, StoredReply
from medagent.hub.schema import SCHEMA_VERSION, SchemaError
from medagent.hub.store import DB_FILE, HubStore, InvalidValue, NotFound, StoreError


def incoming(agent_id: str, i: int, channel: str = "adt", message_type: str = "ADT^A01",
             received_at: int = 1_000, **extra: object) -> IncomingMessage:
    return IncomingMessage(agent_id=agent_id, channel=channel, remote="r", callback=f"cb-{i}",
                           content_type="x-application/hl7-v2+er7", body=f"MSH|{i}", received_at=received_at,
                           control_id=f"C{i}", message_type=message_type, **extra)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> HubStore:
    hub_store = HubStore(tmp_path)
    yield hub_store
    hub_store.close()


def test_schema_is_versioned_and_wal(store: HubStore) -> None:
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / DB_FILE)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaError, match="newer"):
        HubStore(tmp_path)


def test_agents_and_channels(store: HubStore) -> None:
    credentials = store.add_agent("lab")
    with pytest.raises(StoreError, match="already exists"):
        store.add_agent("lab")
    with pytest.raises(InvalidValue):
        store.add_agent("  ")
    assert store.find_agent("lab").id == credentials.agent_id
    assert store.find_agent(credentials.agent_id).name == "lab"
    channel = store.add_channel(credentials.agent_id, "adt", "mllp://0.0.0.0:2575")
    with pytest.raises(StoreError, match="already has a channel"):
        store.add_channel(credentials.agent_id, "adt", "mllp://0.0.0.0:2576")
    with pytest.raises(InvalidValue, match="scheme"):
        store.add_channel(credentials.agent_id, "web", "http://x")
    with pytest.raises(InvalidValue, match="module:function"):
        store.add_channel(credentials.agent_id, "b", "mllp://0.0.0.0:1", bot="nocolon")
    with pytest.raises(NotFound):
        store.add_channel("nope", "c", "mllp://0.0.0.0:1")
    found = store.channel_bot(credentials.agent_id, "adt")
    assert found is not None and found[0] == channel and found[1].callable == "medagent.hub.bots.ack:handler"
    assert store.channel_bot(credentials.agent_id, "missing") is None


def test_intake_deduplicates_by_callback(store: HubStore) -> None:
    messages = [incoming("a", i) for i in range(5)]
    assert [r.kind for r in store.store_incoming(messages)] == [IntakeKind.NEW] * 5
    store.record_results([MessageResult("cb-1", MessageStatus.PROCESSED, StoredReply("ACK", "x", 200), None, 2_000)])
    again = store.store_incoming([incoming("a", 1), incoming("a", 2), incoming("a", 9), incoming("a", 9)])
    assert again[0].kind is IntakeKind.DUPLICATE and again[0].reply == StoredReply("ACK", "x", 200)
    assert again[1].kind is IntakeKind.DUPLICATE and again[1].reply is None  # stored, never answered
    assert [r.kind for r in again[2:]] == [IntakeKind.NEW, IntakeKind.DUPLICATE]
    assert store.get_message("cb-1").duplicate == 1
    assert store.get_message("cb-9").duplicate == 1
    copy = store.store_incoming([incoming("a", 10, duplicate_of="cb-1")])
    assert copy[0].kind is IntakeKind.DUPLICATE and copy[0].reply == StoredReply("ACK", "x", 200)
    assert store.get_message("cb-10").duplicate_of == "cb-1"


def test_keyset_paging_and_filters(store: HubStore) -> None:
    store.store_incoming([incoming("a", i, received_at=1_000 + i) for i in range(25)])
    store.store_incoming([incoming("b", 100 + i, channel="lab", message_type="ORU^R01") for i in range(5)])
    seen: list[str] = []
    after = 0
    for _ in range(10):
        page = store.query_messages(MessageQuery(agent_id="a", after_id=after, limit=10))
        seen += [m.callback for m in page.messages]
        if page.next_after_id is None:
            break
        after = page.next_after_id
    assert seen == [f"cb-{i}" for i in range(25)]
    assert all(m.body is None for m in page.messages)
    assert store.query_messages(MessageQuery(include_body=True, limit=1)).messages[0].body == "MSH|0"
    assert len(store.query_messages(MessageQuery(message_type="ORU")).messages) == 5
    assert len(store.query_messages(MessageQuery(message_type="ADT^A01")).messages) == 25
    assert len(store.query_messages(MessageQuery(message_type="ADT^A0")).messages) == 0
    assert len(store.query_messages(MessageQuery(channel="lab", agent_id="b")).messages) == 5
    assert [m.callback for m in store.query_messages(MessageQuery(control_id="C7")).messages] == ["cb-7"]
    assert len(store.query_messages(MessageQuery(agent_id="a", since=1_010, until=1_015)).messages) == 5
    assert len(store.query_messages(MessageQuery(status=MessageStatus.RECEIVED, limit=5000)).messages) == 30


def test_resources_upsert_by_identifier(store: HubStore) -> None:
    first = store.upsert_resource("Patient", "sys|1", {"gender": "male"})
    second = store.upsert_resource("Patient", "sys|1", {"gender": "female"})
    assert first.id == second.id
    assert store.get_resource("Patient", first.id).resource == {"gender": "female", "resourceType": "Patient",
                                                                "id": first.id}
    assert [r.id for r in store.find_resources("Patient", "sys|1")] == [first.id]
    with pytest.raises(NotFound):
        store.get_resource("Patient", "nope")


def test_channel_update_remove_and_secret_reset(store: HubStore) -> None:
    from medagent.hub.auth import verify_secret
    from medagent.hub.records import ChannelStatus

    credentials = store.add_agent("lab")
    channel = store.add_channel(credentials.agent_id, "adt", "mllp://0.0.0.0:2575")
    updated = store.update_channel(channel.id, address="mllp://0.0.0.0:2600", bot="hubtest_bots:silent")
    assert store.get_channel(channel.id) == updated
    assert updated.address == "mllp://0.0.0.0:2600" and store.get_bot(updated.bot_id).callable == "hubtest_bots:silent"
    assert store.update_channel(channel.id, status=ChannelStatus.OFF).status is ChannelStatus.OFF
    with pytest.raises(InvalidValue):
        store.update_channel(channel.id, address="ftp://x")
    store.remove_channel(channel.id)
    assert store.list_channels(credentials.agent_id) == []
    with pytest.raises(NotFound):
        store.remove_channel(channel.id)

    renewed = store.reset_client_secret(credentials.agent_id)
    assert (renewed.agent_id, renewed.client_id) == (credentials.agent_id, credentials.client_id)
    found = store.client_secret_hash(credentials.client_id)
    assert found is not None
    assert verify_secret(renewed.client_secret, found[1]) and not verify_secret(credentials.client_secret, found[1])
