"""Immediate-mode messages: the device is answered at receipt, the hub's copy lingers in the
dispatcher's buffer (like fast-mode rows) and goes out in order, with unique callbacks, at the
linger's end or when the runtime stops. Real runtime and websocket against the Medplum stand-in."""

from __future__ import annotations

import asyncio

from mllp_peer import AsyncMllpClient, free_port, hl7, msa
from test_reload_standin import ChannelListStandIn, agent_config, until

from medagent.runtime.agent import AgentRuntime


def _control_ids(standin: ChannelListStandIn) -> list[str]:
    return [str(f.get("body", "")).split("\r", 1)[0].split("|")[9]
            for f in standin.frames_of("agent:transmit:request")]


async def _start(tmp_path) -> tuple[ChannelListStandIn, AgentRuntime, int]:
    standin = ChannelListStandIn()
    standin.hold_agent_reads_until_reload = False
    standin.reload_after_connect = False
    await standin.start()
    port = free_port()
    standin.addresses["imm-in"] = f"mllp://127.0.0.1:{port}?ackMode=immediate"
    runtime = AgentRuntime(agent_config(standin, tmp_path / "data"))
    await runtime.start()
    await until(lambda: runtime.stats()["link"]["live"], "the link")
    return standin, runtime, port


async def test_immediate_messages_reach_the_hub_in_order_with_unique_callbacks(tmp_path) -> None:
    standin, runtime, port = await _start(tmp_path)
    try:
        client = await AsyncMllpClient.connect(port)
        ids = [f"IM{n}" for n in range(6)]
        for control_id in ids:
            assert msa(await client.roundtrip(hl7(control_id))) == ("AA", control_id)
        await client.close()
        await until(lambda: len(_control_ids(standin)) >= len(ids), "the hub's copies")
        assert _control_ids(standin) == ids
        callbacks = [f["callback"] for f in standin.frames_of("agent:transmit:request")]
        assert len(set(callbacks)) == len(ids)
        assert runtime.stats()["dispatch"]["immediateBuffered"] == 0
    finally:
        await runtime.stop()
        await standin.stop()


async def test_lingering_immediate_messages_are_sent_when_the_runtime_stops(tmp_path) -> None:
    standin, runtime, port = await _start(tmp_path)
    stopped = False
    try:
        assert runtime.dispatcher is not None
        runtime.dispatcher._linger_s = 60.0  # nothing leaves by the timer during this test
        client = await AsyncMllpClient.connect(port)
        for control_id in ("L1", "L2"):
            assert msa(await client.roundtrip(hl7(control_id))) == ("AA", control_id)
        await client.close()
        await asyncio.sleep(0.2)
        assert _control_ids(standin) == []
        assert runtime.stats()["dispatch"]["immediateBuffered"] == 2
        await runtime.stop()
        stopped = True
        await until(lambda: len(_control_ids(standin)) >= 2, "the lingering copies")
        assert _control_ids(standin) == ["L1", "L2"]
    finally:
        if not stopped:
            await runtime.stop()
        await standin.stop()
