"""The hub's batch ack and the replies after it leave in one TCP segment (hub/websocket.py _flush).

At one lock-step sender every message costs the agent a wake-up per segment the hub sends it;
the ack and the replies sent with it are framed together and written in one transport write, so
the agent reads both at once. Counted with the kernel's own per-socket counter (TCP_INFO
data_segs_in), not with timing. The hub frames them itself, so the other tests here check every
length encoding of RFC 6455 §5.2 and the write path's flow control with a real websocket client.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys

import orjson
import pytest
from hubtest import SpecAgent, adt, transmit, wait_for

from medagent.hub import AgentCredentials, HubServer, websocket

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO's data_segs_in is Linux's")

#: offset of ``tcpi_data_segs_in`` (u32) in Linux's struct tcp_info (since 4.6)
_DATA_SEGS_IN = 152


def data_segments_in(client: SpecAgent) -> int:
    sock = client.ws.transport.get_extra_info("socket")
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, _DATA_SEGS_IN)[0]


async def test_ack_and_reply_arrive_in_one_segment(hub: HubServer, agent: AgentCredentials) -> None:
    """A resend of an answered message: the stored reply follows the ack in the same write (an
    inline bot's reply to a new message leaves earlier on SQLite, while its round commits)."""
    client = await SpecAgent.connected(hub, agent)
    await client.send({"type": "agent:batch", "seq": 1, "messages": [transmit("adt", adt("S0"), "seg-0")]})
    await client.acked_responses(1, 1)
    for seq in (2, 3, 4):  # several, so one lucky coalescing of two writes cannot pass it
        before = data_segments_in(client)
        await client.send({"type": "agent:batch", "seq": seq, "messages": [transmit("adt", adt("S0"), "seg-0")]})
        assert await client.recv() == {"type": "agent:batch:ack", "seq": seq}
        reply = await client.recv()
        assert reply["type"] == "agent:transmit:response" and reply["callback"] == "seg-0"
        assert data_segments_in(client) - before == 1
    await client.close()


async def test_frames_of_every_length_encoding_arrive_whole(hub: HubServer, agent: AgentCredentials) -> None:
    """A 7-bit length (the ack), a 16-bit one (one reply) and a 64-bit one (400 replies in one
    agent:batch frame), each written whole."""
    client = await SpecAgent.connected(hub, agent)
    sizes: dict[str, int] = {}
    for seq, count in ((1, 1), (2, 400)):
        callbacks = [f"len-{seq}-{i}" for i in range(count)]
        await client.send({"type": "agent:batch", "seq": seq,
                           "messages": [transmit("adt", adt(c), c) for c in callbacks]})
        replies = "agent:batch" if count > 1 else "agent:transmit:response"
        frames = {}
        for _ in range(2):  # the ack and the replies, in the order of the store engine
            raw = await asyncio.wait_for(client.ws.recv(), 10)
            frame = orjson.loads(raw)
            frames[frame["type"]] = frame
            sizes[f"{frame['type']} {count}"] = len(raw)
        assert set(frames) == {"agent:batch:ack", replies}
        items = frames[replies]["messages"] if count > 1 else [frames[replies]]
        assert [m["callback"] for m in items] == callbacks
    assert sizes["agent:batch:ack 1"] < 126 and 126 <= sizes["agent:transmit:response 1"] < 65536
    assert sizes["agent:batch 400"] >= 65536
    await client.close()


async def test_replies_wait_for_an_agent_that_stops_reading(hub: HubServer, agent: AgentCredentials) -> None:
    """More reply bytes than the sockets hold while the agent reads nothing: the hub's transport
    holds the rest, over its high-water mark (where the hub's next write waits for it to drain,
    aiohttp's flow control); once the agent reads, every frame arrives, whole and in order."""
    client = await SpecAgent.connected(hub, agent)
    connection = hub.context.registry.current(agent.agent_id)
    assert connection is not None
    hub_transport = connection._transport  # small buffers, so a few batches exceed them
    hub_transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    hub_transport.set_write_buffer_limits(high=8192)
    client.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.ws.transport.pause_reading()
    batches, per_batch = 8, 200  # ~60 KB of replies per batch
    for seq in range(1, batches + 1):
        await client.send({"type": "agent:batch", "seq": seq,
                           "messages": [transmit("adt", adt(f"bp{seq}"), f"bp-{seq}-{i}") for i in range(per_batch)]})
    await wait_for(lambda: hub_transport.get_write_buffer_size() > 8192)  # held: the writer waits
    client.ws.transport.resume_reading()
    received: list[str] = []
    acks: list[int] = []
    async with asyncio.timeout(30):
        while len(received) < batches * per_batch or not acks or acks[-1] < batches:
            frame = await client.recv(timeout=30)
            if frame["type"] == "agent:batch:ack":
                acks.append(frame["seq"])
            elif frame["type"] == "agent:batch":
                received += [m["callback"] for m in frame["messages"]]
    assert received == [f"bp-{seq}-{i}" for seq in range(1, batches + 1) for i in range(per_batch)]
    assert acks == sorted(acks) and acks[-1] == batches
    assert hub_transport.get_write_buffer_size() == 0
    await client.close()


async def test_an_ack_alone_rides_in_the_next_write_or_leaves_after_the_linger(
        hub: HubServer, agent: AgentCredentials, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch ack with no reply to carry it waits for the connection's next write: with a long
    linger, the ack of batch 1 arrives in the same segment as the reply to batch 2."""
    monkeypatch.setattr(websocket, "ACK_LINGER_S", 30.0)
    client = await SpecAgent.connected(hub, agent)
    await client.send({"type": "agent:batch", "seq": 1, "messages": [transmit("adt", adt("L1"), "linger-1")]})
    frames, _ = await client.acked_responses(0, 1)
    acks = [f for f in frames if f["type"] == "agent:batch:ack"]
    if not acks:  # SQLite: the reply left before the commit, the ack waits for a ride
        with pytest.raises(TimeoutError):
            await client.recv(timeout=0.3)
        before = data_segments_in(client)
        await client.send({"type": "agent:batch", "seq": 2, "messages": [transmit("adt", adt("L2"), "linger-2")]})
        reply = await client.recv()
        assert (reply["type"], reply["callback"]) == ("agent:transmit:response", "linger-2")
        assert await client.recv() == {"type": "agent:batch:ack", "seq": 1}
        assert data_segments_in(client) - before == 1
    else:  # PostgreSQL: the reply follows the commit, and the ack rides in front of it
        assert acks == [{"type": "agent:batch:ack", "seq": 1}] and frames[0] == acks[0]
    await client.close()


async def test_with_the_default_linger_an_ack_alone_arrives_at_once(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    quiet = transmit("adt", adt("Q1"), "quiet-1", noReply=True)
    await client.send({"type": "agent:batch", "seq": 1, "messages": [quiet]})
    assert await client.recv(timeout=2.0) == {"type": "agent:batch:ack", "seq": 1}
    await client.close()
