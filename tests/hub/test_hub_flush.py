"""The hub's batch ack and the replies after it leave in one TCP segment (hub/websocket.py _flush).

At one lock-step sender every message costs the agent a wake-up per segment the hub sends it;
the ack and the inline bot's reply of a batch are written in one flush and corked, so the agent
reads both at once. Counted with the kernel's own per-socket counter (TCP_INFO data_segs_in), not
with timing.
"""

from __future__ import annotations

import socket
import struct
import sys

import pytest
from hubtest import SpecAgent, adt, transmit

from medagent.hub import AgentCredentials, HubServer

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not hasattr(socket, "TCP_CORK"),
                                reason="TCP_CORK and TCP_INFO's data_segs_in are Linux's")

#: offset of ``tcpi_data_segs_in`` (u32) in Linux's struct tcp_info (since 4.6)
_DATA_SEGS_IN = 152


def data_segments_in(client: SpecAgent) -> int:
    sock = client.ws.transport.get_extra_info("socket")
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, _DATA_SEGS_IN)[0]


async def test_ack_and_reply_arrive_in_one_segment(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    for seq in (1, 2, 3):  # several, so one lucky coalescing of two writes cannot pass it
        before = data_segments_in(client)
        await client.send({"type": "agent:batch", "seq": seq, "messages": [transmit("adt", adt(f"S{seq}"), f"seg-{seq}")]})
        assert await client.recv() == {"type": "agent:batch:ack", "seq": seq}
        reply = await client.recv()
        assert reply["type"] == "agent:transmit:response" and reply["callback"] == f"seg-{seq}"
        assert data_segments_in(client) - before == 1
    await client.close()
