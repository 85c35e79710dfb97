"""/ws/agent: handshake errors per spec §1.2, heartbeats §1.3, malformed frames §2."""

from __future__ import annotations

import time
from pathlib import Path

from hubtest import SpecAgent, adt, get_token, hub_settings, transmit, wait_for

from medagent import __version__
from medagent.hub import AgentCredentials, HubServer
from medagent.hub.auth import SIGNING_KEY_FILE, TokenSigner
from medagent.hub.records import MessageQuery


async def test_connect_errors_keep_the_socket_open(hub: HubServer, agent: AgentCredentials) -> None:
    other = await hub.store.add_agent("other-lab")
    token = await get_token(hub, agent)
    client = await SpecAgent.open(hub)
    cases = [
        ({"type": "agent:connect:request", "agentId": agent.agent_id}, "Missing access token"),
        ({"type": "agent:connect:request", "accessToken": token}, "Missing agent ID"),
        ({"type": "agent:connect:request", "accessToken": "junk", "agentId": agent.agent_id}, "Invalid access token"),
        # a valid token may not act as another agent
        ({"type": "agent:connect:request", "accessToken": token, "agentId": other.agent_id}, "Invalid access token"),
    ]
    for frame, expected in cases:
        await client.send(frame)
        assert await client.recv() == {"type": "agent:error", "body": expected}
    # the same socket still accepts a good handshake
    await client.send({"type": "agent:connect:request", "accessToken": token, "agentId": agent.agent_id})
    assert (await client.recv())["type"] == "agent:connect:response"
    await client.close()


async def test_expired_token_is_invalid(hub: HubServer, agent: AgentCredentials) -> None:
    key = bytes.fromhex((hub.data_dir / SIGNING_KEY_FILE).read_text())
    expired = TokenSigner(key, ttl_s=60).issue(agent.agent_id, now=time.time() - 3600)
    client = await SpecAgent.open(hub)
    await client.send({"type": "agent:connect:request", "accessToken": expired, "agentId": agent.agent_id})
    assert await client.recv() == {"type": "agent:error", "body": "Invalid access token"}
    await client.close()


async def test_frames_before_connect_are_refused(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.open(hub)
    await client.send({"type": "agent:heartbeat:request", "callback": "hb-0"})
    error = await client.recv()
    assert error["type"] == "agent:error" and error["callback"] == "hb-0"
    assert "agent:connect:request" in error["body"]
    await client.close()


async def test_hub_answers_heartbeat_with_its_version(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    await client.send({"type": "agent:heartbeat:request"})
    assert await client.recv_type("agent:heartbeat:response") == {"type": "agent:heartbeat:response",
                                                                   "version": __version__}
    await client.close()


async def test_hub_sends_heartbeats_and_records_agent_version(tmp_path: Path) -> None:
    async with HubServer(hub_settings(tmp_path, heartbeat_interval_s=0.05)) as hub:
        credentials = await hub.store.add_agent("beating")
        client = await SpecAgent.connected(hub, credentials)
        request = await client.recv_type("agent:heartbeat:request")
        assert request == {"type": "agent:heartbeat:request"}
        await client.send({"type": "agent:heartbeat:response", "version": "9.8.7"})
        await wait_for(lambda: _version_is(hub, credentials.agent_id, "9.8.7"))
        await client.close()


async def test_malformed_frames_get_agent_error(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    await client.send_raw("{not json")
    error = await client.recv_type("agent:error")
    assert error["body"].startswith("Invalid message: not JSON") and "callback" not in error

    await client.send_raw("[1, 2]")
    assert "JSON object" in (await client.recv_type("agent:error"))["body"]

    await client.send({"callback": "cb-notype"})
    error = await client.recv_type("agent:error")
    assert error["callback"] == "cb-notype" and "type" in error["body"]

    await client.send({"type": "agent:frobnicate", "callback": "cb-unknown"})
    assert await client.recv_type("agent:error") == {
        "type": "agent:error", "body": "Unknown message type: agent:frobnicate", "callback": "cb-unknown"}

    await client.send({"type": "agent:transmit:request", "channel": "adt", "callback": "cb-missing"})
    error = await client.recv_type("agent:error")
    assert error["callback"] == "cb-missing" and "missing field" in error["body"]

    await client.send({"type": "agent:transmit:request", "remote": "r", "contentType": "text/plain", "body": 5,
                       "channel": "adt", "callback": "cb-wrongtype"})
    error = await client.recv_type("agent:error")
    assert error["callback"] == "cb-wrongtype" and "wrong type" in error["body"]

    await client.send({"type": "agent:reloadconfig:request", "callback": "cb-direction"})
    error = await client.recv_type("agent:error")
    assert error["callback"] == "cb-direction" and "Unexpected message type" in error["body"]

    # the connection is still live after all that
    await client.send({"type": "agent:heartbeat:request"})
    assert (await client.recv_type("agent:heartbeat:response"))["version"] == __version__
    await client.close()


async def test_binary_frames_are_accepted(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    await client.ws.send(b'{"type":"agent:heartbeat:request"}')
    assert (await client.recv_type("agent:heartbeat:response"))["version"] == __version__
    await client.close()


async def test_disconnect_unregisters(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    assert (await hub.context.bus.presence(agent.agent_id)).connected
    assert hub.context.registry.current(agent.agent_id) is not None
    await client.close()
    await wait_for(lambda: _disconnected(hub, agent.agent_id))
    assert hub.context.registry.current(agent.agent_id) is None


async def test_batch_seq_must_climb_and_acks_follow_storage(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    await client.send({"type": "agent:batch", "seq": 2, "messages": [transmit("adt", adt("S1"), "seq-1")]})
    assert await client.recv_type("agent:batch:ack") == {"type": "agent:batch:ack", "seq": 2}
    # a replayed or reordered seq on the same connection is refused, not stored, not acked
    await client.send({"type": "agent:batch", "seq": 2, "messages": [transmit("adt", adt("S2"), "seq-2")]})
    error = await client.recv_type("agent:error")
    assert error == {"type": "agent:error", "body": "agent:batch seq 2 is not above 2"}
    await client.send({"type": "agent:batch", "seq": 3, "messages": [transmit("adt", adt("S3"), "seq-3")]})
    assert await client.recv_type("agent:batch:ack") == {"type": "agent:batch:ack", "seq": 3}
    stored = {m.callback for m in (await hub.store.query_messages(MessageQuery(agent_id=agent.agent_id))).messages}
    assert stored == {"seq-1", "seq-3"}
    await client.close()


async def _version_is(hub: HubServer, agent_id: str, version: str) -> bool:
    return (await hub.context.bus.presence(agent_id)).version == version


async def _disconnected(hub: HubServer, agent_id: str) -> bool:
    return not (await hub.context.bus.presence(agent_id)).connected
