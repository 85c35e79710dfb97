"""medagent.cloud.link against the real medagent hub (medagent.hub.HubServer) on 127.0.0.1:0.

The hub advertises the batching extension, so these tests cover batch mode (agent:batch frames,
cumulative agent:batch:ack) and, with ``use_batching=False``, that the link falls back to one
frame per message against a hub that would accept batches. Hub operations (``$push``, ``$stats``,
``$reload-config``) reach the link's handler and come back with their callback.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from engines.postgres import postgres_server, postgres_url, store_url  # noqa: F401 - fixtures
from test_link_medplum import ADT, RecordingHandler, eventually, no_proxy_env  # noqa: F401 (autouse)

from medagent import __version__
from medagent.cloud import messages as m
from medagent.cloud.link import AgentLink, LinkSettings
from medagent.hub import AgentCredentials, HubServer, HubSettings

ACK_BOT = "medagent.hub.bots.ack:handler"


@pytest.fixture
async def hub(tmp_path: Path, store_url: str | None) -> AsyncIterator[HubServer]:  # noqa: F811 - the fixture
    """The hub on each store engine (SQLite, PostgreSQL: tests/engines/postgres.py)."""
    server = HubServer(HubSettings(data_dir=tmp_path / "hub", store=store_url, port=0, heartbeat_interval_s=30.0))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def agent(hub: HubServer) -> AgentCredentials:
    credentials = await hub.store.add_agent("lab")
    await hub.store.add_channel(credentials.agent_id, "adt-in", "mllp://0.0.0.0:2575", ACK_BOT)
    return credentials


@contextlib.asynccontextmanager
async def running_link(
    hub: HubServer, agent: AgentCredentials, handler: RecordingHandler, **overrides: Any
) -> AsyncIterator[AgentLink]:
    values: dict[str, Any] = dict(
        base_url=hub.url, client_id=agent.client_id, client_secret=agent.client_secret, agent_id=agent.agent_id,
        heartbeat_s=0.2, reconnect_min_s=0.02, reconnect_max_s=0.2, request_timeout_s=5.0,
    )
    values.update(overrides)
    link = AgentLink(LinkSettings(**values), handler)
    await link.start()
    try:
        await eventually(lambda: link.live, what="live")
        yield link
    finally:
        await link.close()


def transmits(agent_id: str, count: int, start: int = 0) -> list[m.TransmitRequest]:
    return [
        m.TransmitRequest(
            remote="10.1.2.3:50432", content_type=m.CONTENT_TYPE_HL7_V2, body=ADT.format(n=n), channel="adt-in",
            callback=m.new_callback(agent_id),
        )
        for n in range(start, start + count)
    ]


async def _operation(hub: HubServer, agent_id: str, name: str, method: str = "GET", json: Any = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    async with aiohttp.ClientSession() as http:
        url = f"{hub.url}/fhir/R4/Agent/{agent_id}/{name}"
        async with http.request(method, url, headers=headers, json=json) as response:
            return response.status, await response.text()


@pytest.mark.parametrize("batching", [True, False], ids=["batch", "plain"])
async def test_transmits_are_confirmed_and_answered(hub: HubServer, agent: AgentCredentials, batching: bool) -> None:
    handler = RecordingHandler()
    async with running_link(hub, agent, handler, use_batching=batching) as link:
        assert "batch" in handler.lives[0]  # the hub advertises the extension either way
        assert link.stats()["batching"] is batching
        sent = transmits(agent.agent_id, 1200)
        assert all(link.send_transmit(message) for message in sent)  # handed over in one iteration
        await eventually(lambda: len(handler.confirmed) == len(sent), timeout=15.0, what="confirmations")
        await eventually(lambda: len(handler.responses) == len(sent), timeout=15.0, what="bot replies")
        callbacks = [message.callback for message in sent]
        assert sorted(handler.confirmed) == sorted(callbacks)
        if batching:
            assert handler.confirmed == callbacks  # cumulative acks confirm in send order
        reply = next(r for r in handler.responses if r.callback == sent[42].callback)
        assert reply.status_code == 200 and "|MSG00042|" in reply.body and reply.body.startswith("MSH|")
        stats = link.stats()
        assert stats["messages_sent"] == len(sent) and stats["unconfirmed"] == 0
        if batching:
            assert 1 < stats["batches_sent"] < len(sent)  # several messages per frame
        else:
            assert stats["batches_sent"] == 0
        stored = await hub.store.get_message(sent[-1].callback)  # type: ignore[arg-type]
        assert stored.channel == "adt-in"


async def test_hub_operations_reach_the_handler(hub: HubServer, agent: AgentCredentials) -> None:
    handler = RecordingHandler()
    async with running_link(hub, agent, handler):
        push = {"destination": "mllp://10.1.2.50:2575", "contentType": m.CONTENT_TYPE_HL7_V2,
                "body": ADT.format(n=7), "waitForResponse": True}
        status, text = await _operation(hub, agent.agent_id, "$push", "POST", push)
        assert (status, text) == (200, "MSA|AA|OUT1")
        status, text = await _operation(hub, agent.agent_id, "$stats")
        assert status == 200 and '\\"live\\":true' in text.replace(" ", "")
        status, text = await _operation(hub, agent.agent_id, "$reload-config", "POST")
        assert status == 400 and "no address" in text
        assert [type(r) for r in handler.requests] == [m.TransmitRequest, m.StatsRequest, m.ReloadConfigRequest]


async def test_heartbeat_request_and_rest_reads(hub: HubServer, agent: AgentCredentials) -> None:
    handler = RecordingHandler()
    async with running_link(hub, agent, handler) as link:
        reply = await link.request(m.HeartbeatRequest())
        assert isinstance(reply, m.HeartbeatResponse) and reply.version == __version__
        await eventually(lambda: link.stats()["last_ping_ms"] is not None, what="ping stat")
        resource = await link.fetch_json(f"/fhir/R4/Agent/{agent.agent_id}")
        assert resource["resourceType"] == "Agent" and resource["id"] == agent.agent_id


async def test_reconnects_when_the_hub_restarts(hub: HubServer, agent: AgentCredentials, tmp_path: Path,
                                                store_url: str | None) -> None:  # noqa: F811 - the fixture
    handler = RecordingHandler()
    async with running_link(hub, agent, handler) as link:
        port = hub.port
        await hub.stop()
        await eventually(lambda: len(handler.downs) == 1, what="on_down")
        restarted = HubServer(HubSettings(data_dir=tmp_path / "hub", store=store_url, port=port, heartbeat_interval_s=30.0))
        await restarted.start()
        try:
            await eventually(lambda: len(handler.lives) == 2 and link.live, what="live again")
            sent = transmits(agent.agent_id, 10)
            assert all(link.send_transmit(message) for message in sent)
            await eventually(lambda: len(handler.confirmed) == 10, what="confirmations after restart")
        finally:
            await restarted.stop()


async def test_bad_credentials_against_the_hub(hub: HubServer, agent: AgentCredentials) -> None:
    handler = RecordingHandler()
    settings = LinkSettings(
        base_url=hub.url, client_id=agent.client_id, client_secret="not-the-secret", agent_id=agent.agent_id,
        reconnect_min_s=0.02, reconnect_max_s=0.1,
    )
    link = AgentLink(settings, handler)
    await link.start()
    try:
        await eventually(lambda: link.stats()["connects"] == 0 and "client_secret" in (link.last_error or ""),
                         what="auth error")
        assert handler.lives == []
    finally:
        await link.close()
