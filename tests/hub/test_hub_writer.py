"""Group commit in the hub's StoreWriter, on each store engine: one transaction per round, all or
nothing, rounds never overlapping, many callers per round under load."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hubtest import wait_for

from medagent.hub import MessageStatus
from medagent.hub.records import IncomingMessage, IntakeKind, MessageResult, StoredReply
from medagent.hub.store import HubStore
from medagent.hub.store.sqlite import SqliteHubStore
from medagent.hub.writer import StoreWriter


def incoming(agent_id: str, callback: str) -> IncomingMessage:
    return IncomingMessage(agent_id=agent_id, channel="adt", remote="r", callback=callback,
                           content_type="x-application/hl7-v2+er7", body="MSH|^~\\&|A", received_at=1_000)


REPLY = StoredReply("MSH|...|ACK", "x-application/hl7-v2+er7", 200)


async def test_writes_of_one_iteration_share_one_transaction(store: HubStore) -> None:
    agent = (await store.add_agent("lab")).agent_id
    writer = StoreWriter(store)
    await writer.start()
    try:
        [first] = await writer.store_incoming([incoming(agent, "cb-1")])
        assert first.kind is IntakeKind.NEW and writer.rounds == 1
        # a reply for cb-1, a resend of cb-1 and a new message, all requested in one iteration
        recorded, resend, new = await asyncio.gather(
            writer.record_results([MessageResult("cb-1", MessageStatus.PROCESSED, REPLY, None, 2_000)]),
            writer.store_incoming([incoming(agent, "cb-1")]),
            writer.store_incoming([incoming(agent, "cb-2")]),
        )
        assert writer.rounds == 2  # one commit for the three calls
        assert recorded is None
        assert resend[0].kind is IntakeKind.DUPLICATE and resend[0].reply == REPLY  # reply written first
        assert new[0].kind is IntakeKind.NEW
        assert (await store.get_message("cb-2")).status is MessageStatus.RECEIVED
    finally:
        await writer.close()


async def test_a_failed_round_fails_every_caller_and_writes_nothing(store: HubStore) -> None:
    agent = (await store.add_agent("lab")).agent_id
    writer = StoreWriter(store)
    await writer.start()
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
            await store.get_message("cb-ok")
    finally:
        await writer.close()


async def test_each_group_of_a_shared_round_is_answered_by_its_own_caller(store: HubStore) -> None:
    agent = (await store.add_agent("lab")).agent_id
    writer = StoreWriter(store)
    await writer.start()
    asked: list[tuple[str, int]] = []

    def answerer(tag: str, group: list[IncomingMessage]) -> Callable[[int], MessageResult | None]:
        def answer(i: int) -> MessageResult:
            asked.append((tag, i))
            return MessageResult(group[i].callback, MessageStatus.PROCESSED, StoredReply(f"{tag}{i}", "x", 200), None, 5)
        return answer

    try:
        first = [incoming(agent, "a-0"), incoming(agent, "a-1")]
        second = [incoming(agent, "b-0")]
        rounds = writer.rounds
        one, two = await asyncio.gather(writer.store_incoming(first, answerer("A", first)),
                                        writer.store_incoming(second, answerer("B", second)))
        assert writer.rounds == rounds + 1  # both groups in one transaction
        assert sorted(asked) == [("A", 0), ("A", 1), ("B", 0)]
        assert [r.reply and r.reply.body for r in one + two] == ["A0", "A1", "B0"]
        assert (await store.get_message("b-0")).reply_body == "B0"
    finally:
        await writer.close()


async def test_concurrent_callers_share_rounds_and_every_message_is_stored_once(store: HubStore) -> None:
    await _fifty_connections(store)


async def test_the_sqlite_writer_thread_variant_keeps_the_same_guarantees(tmp_path: Path) -> None:
    threaded = SqliteHubStore(tmp_path, writer_thread=True)
    try:
        await _fifty_connections(threaded)
    finally:
        await threaded.close()


@pytest.mark.parametrize("writer_thread", [False, True])
async def test_before_commit_runs_on_the_loop_once_per_round_before_the_caller_resumes(
        tmp_path: Path, writer_thread: bool) -> None:
    """SQLite calls each group's before_commit on the event loop's thread, threaded or not, before
    the caller's store_incoming returns (the intake sends replies from it)."""
    store = SqliteHubStore(tmp_path, writer_thread=writer_thread)
    writer = StoreWriter(store)
    await writer.start()
    calls: list[tuple[str, bool]] = []
    loop_thread = threading.get_ident()
    try:
        agent = (await store.add_agent("lab")).agent_id

        async def one(name: str) -> None:
            hook = lambda: calls.append((name, threading.get_ident() == loop_thread))
            await writer.store_incoming([incoming(agent, name)], None, hook)
            assert (name, True) in calls

        await asyncio.gather(*(one(f"hook-{i}") for i in range(10)))
        assert sorted(calls) == sorted((f"hook-{i}", True) for i in range(10))
    finally:
        await writer.close()
        await store.close()


async def _fifty_connections(store: HubStore) -> None:
    """50 connections, each storing 20 batches (with resends of its previous batch) as fast as
    rounds commit: fewer rounds than calls, no message lost or stored twice."""
    agent = (await store.add_agent("lab")).agent_id
    writer = StoreWriter(store)
    await writer.start()

    async def connection(n: int) -> int:
        new = 0
        for b in range(20):
            batch = [incoming(agent, f"c{n}-{b}-{i}") for i in range(5)]
            resends = [incoming(agent, f"c{n}-{b - 1}-{i}") for i in range(2)] if b else []
            results = await writer.store_incoming(batch + resends)
            new += sum(r.kind is IntakeKind.NEW for r in results)
            assert all(r.kind is IntakeKind.DUPLICATE for r in results[len(batch):])
        return new

    try:
        counts = await asyncio.gather(*(connection(n) for n in range(50)))
        assert sum(counts) == 50 * 20 * 5
        assert writer.rounds < 50 * 20  # group commit: several callers per round
        assert await store.count_rows("messages") == 50 * 20 * 5
        assert (await store.get_message("c7-3-1")).duplicate == 1
    finally:
        await writer.close()


async def _writer_with_deferred_result(store: HubStore) -> tuple[StoreWriter, int, list[BaseException | None]]:
    """A started writer that stored message cb-1 (one round) and holds its PROCESSED result,
    deferred; (writer, agent id, what the result's callback was told so far)."""
    agent = (await store.add_agent("lab")).agent_id
    writer = StoreWriter(store)
    await writer.start()
    told: list[BaseException | None] = []
    await writer.store_incoming([incoming(agent, "cb-1")])
    writer.defer_results([MessageResult("cb-1", MessageStatus.PROCESSED, REPLY, None, 2_000)], told.append)
    return writer, agent, told


async def test_deferred_results_ride_the_next_inbound_round(store: HubStore) -> None:
    writer, agent, told = await _writer_with_deferred_result(store)
    try:
        assert told == [] and writer.rounds == 1  # no round of their own yet
        [resend] = await writer.store_incoming([incoming(agent, "cb-1")])
        assert told == [None] and writer.rounds == 2  # one commit for the inbound message and the result
        assert resend.reply == REPLY
    finally:
        await writer.close()


async def test_deferred_results_alone_commit_after_the_linger(store: HubStore) -> None:
    writer, _agent, told = await _writer_with_deferred_result(store)
    try:
        await wait_for(lambda: told == [None])
        assert (await store.get_message("cb-1")).status is MessageStatus.PROCESSED
    finally:
        await writer.close()


async def test_close_writes_deferred_results_and_a_failed_round_tells_them(store: HubStore) -> None:
    writer, agent, told = await _writer_with_deferred_result(store)
    await writer.close()
    assert told == [None]
    assert (await store.get_message("cb-1")).status is MessageStatus.PROCESSED

    writer = StoreWriter(store)
    await writer.start()
    broken = IncomingMessage(agent_id=agent, channel="adt", remote="r", callback="cb-x",
                             content_type="text/plain", body=None, received_at=1)  # type: ignore[arg-type]
    try:
        writer.defer_results([MessageResult("cb-1", MessageStatus.ERROR, REPLY, "x", 3_000)], told.append)
        with pytest.raises(Exception):  # noqa: B017 - each engine raises its own error type
            await writer.store_incoming([broken])
        assert told[1] is not None  # the result shared the failed round: its owner learns of it
        assert (await store.get_message("cb-1")).status is MessageStatus.PROCESSED  # nothing written
    finally:
        await writer.close()
