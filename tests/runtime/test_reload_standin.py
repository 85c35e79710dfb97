"""Issue 13, defect 1: reloads from a Medplum-protocol server during start-up and during traffic.

The agent runs in-process (AgentRuntime) against the Medplum stand-in (tests/cloud), which sends
``agent:reloadconfig:request`` right after ``agent:connect:response`` (``reload_after_connect``).
Here it also serves the Agent's channel list as Medplum does (Agent.channel -> Endpoint.address)
and can hold the Agent read back until it has pushed that reload, so the reload arrives while
start-up is still reading its channel list: the original failure. Real sockets, real queue, real
websocket; both event loops.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from mllp_peer import AsyncMllpClient, blocker, free_port, hl7, msa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cloud"))
from medplum_standin import MedplumStandIn

from medagent.config import load_config
from medagent.runtime.agent import AgentRuntime, StartupError

WAIT_S = 10.0


class ChannelListStandIn(MedplumStandIn):
    """The stand-in plus Medplum's channel list, and a reload pushed right after connect."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(reload_after_connect=True, **kwargs)
        self.addresses: dict[str, str] = {}
        self.settings: list[dict[str, Any]] = []  # Agent.setting[] (keepAlive, maxClientsPerRemote)
        self.hold_agent_reads_until_reload = True

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/oauth2/token", self._token)
        app.router.add_get("/fhir/R4/Agent/{id}", self._agent_resource)
        app.router.add_get("/fhir/R4/Endpoint/{id}", self._endpoint_resource)
        app.router.add_get("/ws/agent", self._websocket)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    async def _agent_resource(self, request: web.Request) -> web.Response:
        if self.hold_agent_reads_until_reload:
            await until(lambda: self.reload_requests_sent > 0, "the reload after connect")
        response = await super()._agent_resource(request)
        if response.status != 200:
            return response
        channels = [{"name": name, "endpoint": {"reference": f"Endpoint/{name}"}} for name in self.addresses]
        return web.json_response({"resourceType": "Agent", "id": self.agent_id, "status": "active",
                                  "channel": channels, "setting": self.settings})

    async def _endpoint_resource(self, request: web.Request) -> web.Response:
        address = self.addresses.get(request.match_info["id"])
        if address is None:
            return web.json_response({"resourceType": "OperationOutcome"}, status=404)
        return web.json_response({"resourceType": "Endpoint", "status": "active", "address": address})


@pytest.fixture
async def standin() -> AsyncIterator[ChannelListStandIn]:
    server = ChannelListStandIn()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def agent_config(standin: MedplumStandIn, data_dir: Path, channels: list[dict[str, str]] | None = None) -> Any:
    overrides: dict[str, Any] = {"agent": {
        "hub": standin.base_url.rstrip("/"), "client_id": standin.client_id, "client_secret": standin.client_secret,
        "agent_id": standin.agent_id, "data_dir": str(data_dir), "reconnect_min_s": "0.05", "reconnect_max_s": "0.5",
    }}
    if channels is not None:
        overrides["channel"] = channels
    return load_config(None, env={}, overrides=overrides)


async def until(predicate: Any, what: str) -> None:
    for _ in range(int(WAIT_S / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def transmitted_control_ids(standin: MedplumStandIn) -> set[str]:
    ids = set()
    for frame in standin.frames_of("agent:transmit:request"):
        msh = str(frame.get("body", "")).split("\r", 1)[0].split("|")
        if len(msh) > 9:
            ids.add(msh[9])
    return ids


async def test_a_reload_right_after_connect_during_start_up_does_not_kill_the_agent(standin, tmp_path) -> None:
    port = free_port()
    standin.addresses["adt-in"] = f"mllp://127.0.0.1:{port}?ackMode=fast"
    runtime = AgentRuntime(agent_config(standin, tmp_path / "data"))
    await runtime.start()  # the original defect: "cannot listen on ...: address already in use"
    try:
        await until(lambda: standin.reload_replies, "the answer to the reload")
        [answer] = standin.reload_replies
        assert answer["type"] == "agent:reloadconfig:response" and answer["statusCode"] == 200
        assert list(runtime.channels) == ["adt-in"]
        client = await AsyncMllpClient.connect(port)
        assert msa(await client.roundtrip(hl7("AFTER1"))) == ("AA", "AFTER1")
        await client.close()
        await until(lambda: "AFTER1" in transmitted_control_ids(standin), "the message at the hub")
        assert standin.violations == []
    finally:
        await runtime.stop()


async def test_reloads_during_traffic_lose_no_message_and_keep_the_connection(standin, tmp_path) -> None:
    port = free_port()
    standin.addresses["adt-in"] = f"mllp://127.0.0.1:{port}?ackMode=fast"
    runtime = AgentRuntime(agent_config(standin, tmp_path / "data"))
    await runtime.start()
    try:
        client = await AsyncMllpClient.connect(port)
        sent = [f"T{i}" for i in range(300)]
        reloads_done = asyncio.Event()

        async def sender() -> None:
            for index, control_id in enumerate(sent):
                assert msa(await client.roundtrip(hl7(control_id))) == ("AA", control_id)
                if index >= 200:  # keep going until every reload has been answered
                    await asyncio.wait_for(reloads_done.wait(), WAIT_S)

        traffic = asyncio.ensure_future(sender())
        answers = []
        for _ in range(8):
            answers.append(await standin.reload_config(timeout=WAIT_S))
            await asyncio.sleep(0.01)
        reloads_done.set()
        await asyncio.wait_for(traffic, 60)
        assert [a["type"] for a in answers] == ["agent:reloadconfig:response"] * 8
        assert all(a["statusCode"] == 200 for a in answers)
        assert msa(await client.roundtrip(hl7("LAST"))) == ("AA", "LAST")  # the same connection, still open
        await client.close()
        await until(lambda: set(sent) | {"LAST"} <= transmitted_control_ids(standin), "every message at the hub")
        assert runtime.channel_set is not None and runtime.channel_set.reloads >= 8
    finally:
        await runtime.stop()


async def test_hub_side_changes_restart_the_channel_and_bad_ones_answer_agent_error(standin, tmp_path) -> None:
    standin.hold_agent_reads_until_reload = False
    standin.reload_after_connect = False
    port = free_port()
    standin.addresses["adt-in"] = f"mllp://127.0.0.1:{port}?ackMode=fast"
    runtime = AgentRuntime(agent_config(standin, tmp_path / "data"))
    await runtime.start()
    try:
        await until(lambda: standin.connected_agents > 0, "the agent's connection")
        client = await AsyncMllpClient.connect(port)
        assert msa(await client.roundtrip(hl7("BEFORE"))) == ("AA", "BEFORE")

        # A bad endpoint: agent:error naming the channel; the running channel and its connection stay.
        standin.addresses["adt-in"] = f"mllp://127.0.0.1:{port}?ackMode=fast&nonsense=1"
        answer = await standin.reload_config(timeout=WAIT_S)
        assert answer["type"] == "agent:error"
        assert answer["body"].startswith("reload failed: channel adt-in: invalid endpoint") and "nonsense" in answer["body"]
        assert msa(await client.roundtrip(hl7("DURING"))) == ("AA", "DURING")

        # A bind that cannot succeed: agent:error with the reason; the channel stays as it was.
        occupied = blocker()
        try:
            taken = occupied.getsockname()[1]
            standin.addresses["adt-in"] = f"mllp://127.0.0.1:{taken}?ackMode=fast"
            answer = await standin.reload_config(timeout=WAIT_S)
        finally:
            occupied.close()
        assert answer["type"] == "agent:error"
        assert answer["body"] == f"reload failed: channel adt-in: cannot listen on 127.0.0.1:{taken}: Address already in use"
        assert msa(await client.roundtrip(hl7("STILL"))) == ("AA", "STILL")

        # A good change on the same address: restarted on the same port, new options in force.
        standin.addresses["adt-in"] = f"mllp://127.0.0.1:{port}?ackMode=two-phase"
        answer = await standin.reload_config(timeout=WAIT_S)
        assert answer["type"] == "agent:reloadconfig:response" and answer["statusCode"] == 200
        await client.close()
        client = await AsyncMllpClient.connect(port)
        assert msa(await client.roundtrip(hl7("AFTER"))) == ("CA", "AFTER")
        await client.close()

        # Removed at the hub: the listener closes, the agent keeps running.
        del standin.addresses["adt-in"]
        answer = await standin.reload_config(timeout=WAIT_S)
        assert answer["statusCode"] == 200 and dict(runtime.channels) == {}
        await until(lambda: {"BEFORE", "DURING", "STILL", "AFTER"} <= transmitted_control_ids(standin),
                    "every message at the hub")
    finally:
        await runtime.stop()


async def test_a_channel_that_cannot_listen_at_first_start_is_one_clear_startup_error(standin, tmp_path) -> None:
    standin.hold_agent_reads_until_reload = False
    occupied = blocker()
    port = occupied.getsockname()[1]
    config = agent_config(standin, tmp_path / "data",
                          channels=[{"name": "adt-in", "endpoint": f"mllp://127.0.0.1:{port}?ackMode=fast"}])
    runtime = AgentRuntime(config)
    try:
        with pytest.raises(StartupError) as caught:
            await runtime.start()
    finally:
        occupied.close()
    assert str(caught.value) == f"channel adt-in: cannot listen on 127.0.0.1:{port}: Address already in use"


async def test_agent_settings_from_the_hub_configure_the_outbound_senders_on_start_and_reload(standin, tmp_path) -> None:
    standin.hold_agent_reads_until_reload = False
    standin.reload_after_connect = False
    standin.settings = [{"name": "keepAlive", "valueBoolean": True}]
    runtime = AgentRuntime(agent_config(standin, tmp_path / "data"))
    await runtime.start()
    try:
        assert runtime.senders.settings == {"keep_alive": True, "max_clients_per_remote": 1}
        await until(lambda: standin.connected_agents > 0, "the agent's connection")
        standin.settings = [{"name": "maxClientsPerRemote", "valueInteger": 3}]
        answer = await standin.reload_config(timeout=WAIT_S)
        assert answer["type"] == "agent:reloadconfig:response"
        assert runtime.senders.settings == {"keep_alive": False, "max_clients_per_remote": 3}
    finally:
        await runtime.stop()
