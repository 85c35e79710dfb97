"""Original mode's fast path through the real hub, on each store engine: inline bots answer
inside the round that stores their message (the row is written once, with its result; on SQLite
the reply leaves while that round commits, before the batch ack), other bots' replies go out before their result commits (it rides the
writer's next round), per-channel order holds, resends are answered once, and the agent's
post-switch health message is answered AA without being stored."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import hubtest_bots
import pytest
from hubtest import SpecAgent, adt, hub_settings, msa, transmit, wait_for
from testsupport import failing_hub_commits

from medagent.hub import AgentCredentials, HubServer, MessageQuery, MessageStatus
from medagent.hub.intake import HEALTH_CHANNEL
from medagent.hub.records import IncomingMessage
from medagent.hub.store import NotFound
from medagent.ops.post_switch import HEALTH_CHANNEL as AGENT_HEALTH_CHANNEL


async def recorded(hub: HubServer, callback: str) -> bool:
    try:
        return (await hub.store.get_message(callback)).processed_at is not None
    except NotFound:
        return False


async def test_one_channels_replies_keep_the_order_received(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    callbacks = [f"order-{i:02d}" for i in range(40)]
    for i, callback in enumerate(callbacks[:20]):  # single frames, sent without waiting
        await client.send(transmit("adt", adt(f"O{i:02d}"), callback))
    await client.send({"type": "agent:batch", "seq": 1,
                       "messages": [transmit("adt", adt(f"O{i + 20:02d}"), c) for i, c in enumerate(callbacks[20:])]})
    responses = await client.responses(40)
    assert [r["callback"] for r in responses] == callbacks
    assert [msa(r["body"])[2] for r in responses] == [f"O{i:02d}" for i in range(40)]
    await client.close()


async def test_an_inline_bot_waits_behind_its_channels_queued_messages(hub: HubServer, agent: AgentCredentials) -> None:
    """A channel whose worker still has messages keeps its order even when its bot became inline."""
    client = await SpecAgent.connected(hub, agent)
    channel = next(c for c in await hub.store.list_channels(agent.agent_id) if c.name == "slow")
    await client.send(transmit("slow", adt("Q1"), "queued-1"))  # a thread bot sleeping past bot_timeout_s
    await wait_for(lambda: "queued-1" in hub.context.dispatcher.inflight)
    await hub.store.update_channel(channel.id, bot="medagent.hub.bots.ack:handler")
    await client.send(transmit("slow", adt("Q2"), "queued-2"))
    responses = await client.responses(2)
    assert [r["callback"] for r in responses] == ["queued-1", "queued-2"]
    assert [msa(r["body"])[1:3] for r in responses] == [["AR", "Q1"], ["AA", "Q2"]]  # AR: the test timeout
    await client.close()


async def test_an_inline_bots_result_is_committed_with_its_message(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    await client.send(transmit("adt", adt("R1"), "result-1"))
    [response] = await client.responses(1)
    record = await hub.store.get_message("result-1")  # no wait: it committed in the round the reply left from
    assert record.status is MessageStatus.PROCESSED and record.reply_body == response["body"]
    assert "result-1" not in hub.context.dispatcher.inflight
    await client.close()


async def test_a_thread_bots_result_is_recorded_after_the_reply(hub: HubServer, agent: AgentCredentials) -> None:
    hub.context.bots.timeout_s = 10.0  # the fixture's 0.3 s is for the slow bots; a loaded box can exceed it here
    client = await SpecAgent.connected(hub, agent)
    await client.send(transmit("counting", adt("T1"), "result-2"))
    [response] = await client.responses(1)
    await wait_for(lambda: recorded(hub, "result-2"))
    record = await hub.store.get_message("result-2")
    assert record.status is MessageStatus.PROCESSED and record.reply_body == response["body"]
    await wait_for(lambda: "result-2" not in hub.context.dispatcher.inflight)  # forgotten once committed
    await client.close()


async def test_a_resend_right_after_the_reply_gets_it_and_the_bot_runs_once(hub: HubServer, agent: AgentCredentials) -> None:
    hubtest_bots.CALLS.clear()
    client = await SpecAgent.connected(hub, agent)
    await client.send(transmit("counting", adt("E1"), "early-1"))
    [first] = await client.responses(1)
    await client.send(transmit("counting", adt("E1"), "early-1"))  # its result may not be committed yet
    [second] = await client.responses(1)
    assert (second["body"], second["statusCode"]) == (first["body"], first["statusCode"])
    assert hubtest_bots.CALLS == ["early-1"]
    await wait_for(lambda: recorded(hub, "early-1"))
    assert (await hub.store.get_message("early-1")).duplicate == 1
    await client.close()


async def test_after_a_crash_before_the_result_commit_a_resend_is_answered_and_stored_once(
        hub: HubServer, agent: AgentCredentials) -> None:
    """What a hub that stopped between the reply and the result commit leaves: the row, no result.
    The agent's resend (it lost the reply with the link) runs the bot again, once, on that row."""
    hubtest_bots.CALLS.clear()
    await hub.store.store_incoming([IncomingMessage(
        agent_id=agent.agent_id, channel="counting", remote="10.1.2.3:50432", callback="crash-1",
        content_type="x-application/hl7-v2+er7", body=adt("C1"), received_at=1_000, control_id="C1",
        message_type="ADT^A01")])
    client = await SpecAgent.connected(hub, agent)
    await client.send({"type": "agent:batch", "seq": 1, "messages": [transmit("counting", adt("C1"), "crash-1")]})
    [response] = await client.responses(1)
    assert msa(response["body"])[1:3] == ["AA", "C1"]
    assert hubtest_bots.CALLS == ["crash-1"]
    await wait_for(lambda: recorded(hub, "crash-1"))
    [only] = (await hub.store.query_messages(MessageQuery(control_id="C1"))).messages
    assert (only.callback, only.duplicate, only.status) == ("crash-1", 1, MessageStatus.PROCESSED)
    await client.close()


async def test_the_health_channel_is_answered_aa_and_not_stored(hub: HubServer, agent: AgentCredentials) -> None:
    assert HEALTH_CHANNEL == AGENT_HEALTH_CHANNEL
    client = await SpecAgent.connected(hub, agent)
    await client.send({"type": "agent:batch", "seq": 1, "messages": [
        transmit(HEALTH_CHANNEL, adt("SWITCH1"), "health-1"),
        transmit(HEALTH_CHANNEL, adt("SWITCH2"), "health-2", noReply=True),
    ]})
    frames: list[dict] = []

    def answered(frame: dict) -> bool:
        frames.extend(frame["messages"] if frame.get("type") == "agent:batch" else [frame])
        return any(f.get("type") == "agent:transmit:response" for f in frames)

    await client.recv_until(answered)
    await asyncio.sleep(0.2)  # anything else the hub would send for this batch arrives meanwhile
    while True:
        try:
            answered(await client.recv(timeout=0.2))
        except TimeoutError:
            break
    responses = [f for f in frames if f.get("type") == "agent:transmit:response"]
    assert [r["callback"] for r in responses] == ["health-1"]
    assert responses[0]["statusCode"] == 200 and msa(responses[0]["body"])[1:3] == ["AA", "SWITCH1"]
    assert not [f for f in frames if f.get("type") == "agent:error"]
    assert {"type": "agent:batch:ack", "seq": 1} in frames
    for callback in ("health-1", "health-2"):
        with pytest.raises(NotFound):
            await hub.store.get_message(callback)
    await client.close()


async def test_another_unknown_channel_is_still_refused(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    await client.send(transmit("upgrade-healthy", adt("U1"), "unknown-1"))
    error = await client.recv_type("agent:error")
    assert (error["callback"], error["body"]) == ("unknown-1", "Channel not found")
    await client.close()


def _flat(frame: dict) -> list[dict]:
    return frame["messages"] if frame.get("type") == "agent:batch" else [frame]


async def _frames_until(client: SpecAgent, done: Callable[[list[dict]], bool]) -> list[dict]:
    frames: list[dict] = []

    def seen(frame: dict) -> bool:
        frames.extend(_flat(frame))
        return done(frames)

    await client.recv_until(seen)
    return frames


async def test_on_sqlite_an_inline_bots_reply_leaves_before_the_batch_ack(
        hub: HubServer, agent: AgentCredentials, store_url: str | None) -> None:
    """SQLite sends the reply while the round commits, so it precedes the ack; PostgreSQL sends it
    after the commit (its insert may still meet a row another hub process stored)."""
    client = await SpecAgent.connected(hub, agent)
    await client.send({"type": "agent:batch", "seq": 1, "messages": [transmit("adt", adt("B1"), "before-ack-1")]})
    frames = await _frames_until(client, lambda fs: {"agent:batch:ack", "agent:transmit:response"} <= {
        f["type"] for f in fs})
    kinds = [f["type"] for f in frames]
    expected = ["agent:transmit:response", "agent:batch:ack"]
    assert kinds == (expected if store_url is None else expected[::-1])
    assert (await hub.store.get_message("before-ack-1")).status is MessageStatus.PROCESSED
    await client.close()


async def test_a_commit_that_fails_after_the_reply_left_asks_for_a_resend(tmp_path: Path) -> None:
    """The round's COMMIT fails after the early reply (a real SQLite error: testsupport's
    failing_hub_commits): no batch ack, the agent is asked to resend, nothing is
    stored; the resend is stored and answered, and the hub's connection is usable again."""
    hub = HubServer(hub_settings(tmp_path))  # SQLite: the engine that replies before its commit
    await hub.start()
    try:
        agent = await hub.store.add_agent("lab")
        await hub.store.add_channel(agent.agent_id, "adt", "mllp://0.0.0.0:2575", "medagent.hub.bots.ack:handler")
        with failing_hub_commits(hub.store.path, "NEW.control_id = 'FAIL1'") as disarm:  # type: ignore[attr-defined]
            client = await SpecAgent.connected(hub, agent)
            await client.send({"type": "agent:batch", "seq": 1, "messages": [transmit("adt", adt("FAIL1"), "fail-1")]})
            frames = await _frames_until(client, lambda fs: any(f["type"] == "agent:error" for f in fs))
            assert [f["type"] for f in frames] == ["agent:transmit:response", "agent:error"]
            assert msa(frames[0]["body"])[1:3] == ["AA", "FAIL1"]
            assert frames[1]["callback"] == "fail-1" and frames[1]["body"].endswith("; resend it")
            with pytest.raises(TimeoutError):
                await client.recv(timeout=0.2)  # no batch ack for the failed round
            with pytest.raises(NotFound):
                await hub.store.get_message("fail-1")
            disarm()
        await client.send({"type": "agent:batch", "seq": 2, "messages": [transmit("adt", adt("FAIL1"), "fail-1")]})
        frames = await _frames_until(client, lambda fs: any(f["type"] == "agent:batch:ack" for f in fs))
        assert [f["type"] for f in frames] == ["agent:transmit:response", "agent:batch:ack"] and frames[1]["seq"] == 2
        record = await hub.store.get_message("fail-1")
        assert (record.status, record.duplicate) == (MessageStatus.PROCESSED, 0)
        await client.close()
    finally:
        await hub.stop()

