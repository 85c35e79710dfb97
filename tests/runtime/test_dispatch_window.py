"""A link that is up but never confirms must not pull the backlog into memory: at most
MAX_UNCONFIRMED rows are out at once, the rest wait on disk. Real runtime, queue and websocket
against the Medplum stand-in (which here never answers transmits)."""

from __future__ import annotations

import asyncio

from mllp_peer import AsyncMllpClient, free_port, hl7, msa
from test_reload_standin import ChannelListStandIn, agent_config, until

from medagent.runtime import dispatcher
from medagent.runtime.agent import AgentRuntime

WINDOW = 5


async def test_unconfirmed_rows_are_capped(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(dispatcher, "MAX_UNCONFIRMED", WINDOW)
    standin = ChannelListStandIn()
    standin.hold_agent_reads_until_reload = False
    standin.reload_after_connect = False
    standin.transmit_reply = "none"  # alive, heartbeats answered, nothing confirmed
    await standin.start()
    port = free_port()
    standin.addresses["adt-in"] = f"mllp://127.0.0.1:{port}?ackMode=fast"
    runtime = AgentRuntime(agent_config(standin, tmp_path / "data"))
    await runtime.start()
    try:
        client = await AsyncMllpClient.connect(port)
        for n in range(4 * WINDOW):
            assert msa(await client.roundtrip(hl7(f"W{n}"))) == ("AA", f"W{n}")  # durable, answered
        await client.close()
        await until(lambda: len(standin.frames_of("agent:transmit:request")) >= WINDOW, "the first window")
        await asyncio.sleep(0.5)  # room for any (wrong) further sends
        assert len(standin.frames_of("agent:transmit:request")) == WINDOW
        stats = runtime.stats()
        assert stats["dispatch"]["inflight"] == WINDOW and stats["dispatch"]["windowWaits"] >= 1
        queue = stats["durableQueue"]
        assert queue["inflight"] == WINDOW and queue["handed_out"] == WINDOW  # the rest stay in the queue
    finally:
        await runtime.stop()
        await standin.stop()


async def test_unconfirmed_bytes_are_capped(tmp_path, monkeypatch) -> None:
    """Large rows hit the byte cap long before the count cap (a 16 KB message x 5,000 is 80 MB)."""
    monkeypatch.setattr(dispatcher, "MAX_UNCONFIRMED_BYTES", 1)
    standin = ChannelListStandIn()
    standin.hold_agent_reads_until_reload = False
    standin.reload_after_connect = False
    standin.transmit_reply = "none"
    await standin.start()
    port = free_port()
    standin.addresses["adt-in"] = f"mllp://127.0.0.1:{port}?ackMode=fast"
    runtime = AgentRuntime(agent_config(standin, tmp_path / "data"))
    await runtime.start()
    try:
        client = await AsyncMllpClient.connect(port)
        for n in range(10):
            assert msa(await client.roundtrip(hl7(f"B{n}"))) == ("AA", f"B{n}")
        await client.close()
        await until(lambda: len(standin.frames_of("agent:transmit:request")) >= 1, "the first send")
        await asyncio.sleep(0.5)
        sent = len(standin.frames_of("agent:transmit:request"))
        dispatch = runtime.stats()["dispatch"]
        assert sent < 10 and dispatch["inflight"] == sent and dispatch["inflightBytes"] > 1
        assert dispatch["windowWaits"] >= 1
    finally:
        await runtime.stop()
        await standin.stop()
