"""A medagent hub sends an inline bot's reply while the round that stores the message commits,
so the agent can get the reply before the batch ack confirming the row. If that commit fails the
agent resends the row: the device, which already has its ACK, must not be answered again — here
a device that reuses its control id, whose next message would otherwise take the resend's ACK.

Real agent runtime, real hub (SQLite) in the same loop, real MLLP device; the failed commit is a
real SQLite error (testsupport.failing_hub_commits)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from mllp_peer import AsyncMllpClient, free_port, hl7
from testsupport import failing_hub_commits

from medagent.config import load_config
from medagent.hub import HubServer, HubSettings, MessageQuery
from medagent.runtime.agent import AgentRuntime


async def connected(port: int) -> AsyncMllpClient:
    """The device, once the agent listens on the channel it took from the hub."""
    for _ in range(250):
        try:
            return await AsyncMllpClient.connect(port)
        except OSError:
            await asyncio.sleep(0.02)
    raise AssertionError(f"the agent never listened on {port}")


def msa_text(ack: bytes) -> str:
    """MSA-3 of an ACK (the tagged bot puts the message's patient name there)."""
    segment = next(s for s in ack.split(b"\r") if s.startswith(b"MSA|"))
    return (segment.decode("latin-1").split("|") + ["", "", ""])[3]


async def test_a_row_answered_before_its_confirmation_is_not_answered_again(tmp_path: Path) -> None:
    hub = HubServer(HubSettings(data_dir=tmp_path / "hub", port=0, heartbeat_interval_s=30.0))
    await hub.start()
    port = free_port()
    credentials = await hub.store.add_agent("lab")
    await hub.store.add_channel(credentials.agent_id, "adt-in", f"mllp://127.0.0.1:{port}", "testbots:tagged")
    runtime = AgentRuntime(load_config(None, env={}, overrides={"agent": {
        "hub": hub.url.rstrip("/"), "client_id": credentials.client_id, "client_secret": credentials.client_secret,
        "agent_id": credentials.agent_id, "data_dir": str(tmp_path / "agent"),
        "reconnect_min_s": "0.05", "reconnect_max_s": "0.5"}}))
    try:
        with failing_hub_commits(hub.store.path, "instr(NEW.body, 'FIRSTFAILS') > 0") as disarm:  # type: ignore[attr-defined]
            await runtime.start()
            device = await connected(port)
            # Its reply leaves before the commit that fails: the device has its ACK, the row is resent.
            assert msa_text(await device.roundtrip(hl7("SAME", "FIRSTFAILS"))) == "FIRSTFAILS"
            # The same control id again, while the first row's resends still fail (and are answered).
            assert msa_text(await device.roundtrip(hl7("SAME", "SECONDOK"))) == "SECONDOK"
            disarm()
        for _ in range(250):
            if len((await hub.store.query_messages(MessageQuery(control_id="SAME"))).messages) == 2:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"the hub did not store both messages: {runtime.stats()}")
        with pytest.raises(TimeoutError):  # no third ACK (the resend's) reaches the device
            await asyncio.wait_for(device.reader.read(1), 0.3)
        dispatch = runtime.stats()["dispatch"]
        assert dispatch["repliesRouted"] == 2 and dispatch["repliesUnroutable"] >= 1, dispatch
        await device.close()
    finally:
        await runtime.stop()
        await hub.stop()
