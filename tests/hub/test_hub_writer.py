"""Group commit in the hub's StoreWriter: one transaction per loop iteration, all or nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from medagent.hub import MessageStatus
from medagent.hub.records import IncomingMessage, IntakeKind, MessageResult, StoredReply
from medagent.hub.store import HubStore
from medagent.hub.writer import StoreWriter


def incoming(agent_id: str, callback: str) -> IncomingMessage:
    return IncomingMessage(agent_id=agent_id, channel="adt", remote="r", callback=callback,
                           content_type="x-application/hl7-v2+er7", body="MSH|^~\\&|A", received_at=1_000)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HubStore]:
    hub_store = HubStore(tmp_path)
    yield hub_store
    hub_store.close()


async def test_writes_of_one_iteration_share_one_transaction(store: HubStore) -> None:
    agent = store.add_agent("lab").agent_id
    writer = StoreWriter(store)
    try:
        [first] = await writer.store_incoming([incoming(agent, "cb-1")])
        assert first.kind is IntakeKind.NEW and writer.rounds == 1
        reply = StoredReply("MSH|...|ACK", "x-application/hl7-v2+er7", 200)
        # a reply for cb-1, a resend of cb-1 and a new message, all requested in one iteration
        recorded, resend, new = await asyncio.gather(
            writer.record_results([MessageResult("cb-1", MessageStatus.PROCESSED, reply, None, 2_000)]),
            writer.store_incoming([incoming(agent, "cb-1")]),
            writer.store_incoming([incoming(agent, "cb-2")]),
        )
        assert writer.rounds == 2  # one commit for the three calls
        assert recorded is None
        assert resend[0].kind is IntakeKind.DUPLICATE and resend[0].reply == reply  # reply written first
        assert new[0].kind is IntakeKind.NEW
        assert store.get_message("cb-2").status is MessageStatus.RECEIVED
    finally:
        writer.close()


async def test_a_failed_round_fails_every_caller_and_writes_nothing(store: HubStore) -> None:
    agent = store.add_agent("lab").agent_id
    writer = StoreWriter(store)
    # body is NOT NULL in the schema: this insert makes the whole round's transaction fail
    broken = IncomingMessage(agent_id=agent, channel="adt", remote="r", callback="cb-x",
                             content_type="text/plain", body=None, received_at=1)  # type: ignore[arg-type]
    try:
        results = await asyncio.gather(
            writer.store_incoming([incoming(agent, "cb-ok")]),
            writer.store_incoming([broken]),
            return_exceptions=True,
        )
        assert all(isinstance(r, Exception) for r in results), results
        assert writer.rounds == 0
        with pytest.raises(Exception):
            store.get_message("cb-ok")
    finally:
        writer.close()
