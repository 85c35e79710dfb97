"""Two hub processes' worth of HubServer in one test: one PostgreSQL store, one Redis bus, each
with its own data directory. What the operator sees must not depend on which process answers:
the secrets are the store's, operations are routed to the process holding the agent's socket,
presence is read from the bus, and a revoked agent's socket is closed wherever it is.
(The same with OS processes and a real agent: test_hub_scaleout.py.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from engines.postgres import postgres_server, postgres_url, store_url  # noqa: F401 - fixtures
from engines.redis_server import own_redis_server, redis_server  # noqa: F401 - fixtures
from hubtest import SpecAgent, adt, get_token, hub_settings, transmit, wait_for

from medagent.hub import HubServer
from medagent.hub.auth import ADMIN_TOKEN_FILE, SIGNING_KEY_FILE

DESTINATION = "mllp://10.1.2.50:2575"
CLI_TIMEOUT_S = 60.0


@pytest.fixture
async def pair(tmp_path: Path, postgres_url: str, redis_server: Any) -> AsyncIterator[tuple[HubServer, HubServer]]:  # noqa: F811
    """Hub 1 and hub 2: one store, one bus (a fresh cluster name per test), own data dirs."""
    bus = f"{redis_server.url}?cluster={uuid.uuid4().hex}&presence_ttl=3"
    hubs = [HubServer(hub_settings(tmp_path / f"h{i}", store=postgres_url, bus=bus, heartbeat_interval_s=0.2,
                                   upgrade_poll_s=0.1))
            for i in (1, 2)]
    started: list[HubServer] = []
    try:
        for hub in hubs:
            await hub.start()
            started.append(hub)
        yield hubs[0], hubs[1]
    finally:
        for hub in reversed(started):
            await hub.stop()


async def _http(hub: HubServer, method: str, path: str, **kwargs: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {hub.admin_token}"}
        async with http.request(method, f"{hub.url}{path}", headers=headers, **kwargs) as response:
            return response.status, await response.text()


async def test_secrets_are_the_stores_so_any_process_accepts_the_others_tokens(pair: tuple[HubServer, HubServer]) -> None:
    hub1, hub2 = pair
    assert hub1.data_dir != hub2.data_dir
    assert hub1.admin_token == hub2.admin_token
    for name in (SIGNING_KEY_FILE, ADMIN_TOKEN_FILE):  # the local copies agree, and stay private
        assert (hub1.data_dir / name).read_text() == (hub2.data_dir / name).read_text()
        assert (hub2.data_dir / name).stat().st_mode & 0o077 == 0
    credentials = await hub1.store.add_agent("lab")
    token = await get_token(hub1, credentials)  # issued by hub 1 ...
    assert (await hub2.context.signer.verify_current(token)).agent_id == credentials.agent_id  # ... good on hub 2
    client = await SpecAgent.open(hub2)
    await client.send({"type": "agent:connect:request", "accessToken": token, "agentId": credentials.agent_id})
    assert (await client.recv_type("agent:connect:response"))["type"] == "agent:connect:response"
    await client.close()


async def test_an_older_hubs_key_file_seeds_the_store(tmp_path: Path, store_url: str | None) -> None:  # noqa: F811
    """Upgrading a hub that kept its key in the data dir: the key moves into the store, so the
    tokens it issued stay valid."""
    data = tmp_path / "hub"
    data.mkdir(mode=0o700)
    (data / SIGNING_KEY_FILE).write_text("ab" * 32)
    (data / ADMIN_TOKEN_FILE).write_text("an-admin-token-of-an-older-hub")
    async with HubServer(hub_settings(tmp_path, store=store_url)) as hub:
        assert hub.admin_token == "an-admin-token-of-an-older-hub"
        assert await hub.store.shared_secret(SIGNING_KEY_FILE, "other") == "ab" * 32


async def test_operations_on_hub2_reach_the_agent_on_hub1(pair: tuple[HubServer, HubServer]) -> None:
    hub1, hub2 = pair
    credentials = await hub1.store.add_agent("lab")
    client = await SpecAgent.connected(hub1, credentials)
    agent_id = credentials.agent_id

    status, text = await _http(hub2, "GET", f"/Agent/{agent_id}/$status")
    assert status == 200 and '"connected"' in text
    status, text = await _http(hub2, "GET", "/Agent/$bulk-status")
    assert status == 200 and '"connected"' in text and agent_id in text

    push = asyncio.create_task(_http(hub2, "POST", f"/Agent/{agent_id}/$push", json={
        "destination": DESTINATION, "contentType": "x-application/hl7-v2+er7", "body": adt("ROUTED1"),
        "waitForResponse": True, "waitTimeout": 5000}))
    request = await client.recv_type("agent:transmit:request")
    assert request["body"] == adt("ROUTED1")
    await client.send({"type": "agent:transmit:response", "remote": DESTINATION, "callback": request["callback"],
                       "contentType": "x-application/hl7-v2+er7", "statusCode": 200, "body": "MSA|AA|ROUTED1"})
    assert await push == (200, "MSA|AA|ROUTED1")

    reload = asyncio.create_task(_http(hub2, "POST", f"/Agent/{agent_id}/$reload-config"))
    request = await client.recv_type("agent:reloadconfig:request")
    await client.send({"type": "agent:reloadconfig:response", "callback": request["callback"], "statusCode": 200})
    status, text = await reload
    assert status == 200, text

    timed_out = await _http(hub2, "POST", f"/Agent/{agent_id}/$reload-config?timeout=300")
    assert timed_out[0] == 400 and "Timeout" in timed_out[1]

    await client.close()
    await wait_for(lambda: _connected(hub2, agent_id, False))
    status, text = await _http(hub2, "POST", f"/Agent/{agent_id}/$reload-config")
    assert status == 400 and "Agent not connected" in text


async def test_status_reports_the_outcome_of_an_upgrade_on_every_process(pair: tuple[HubServer, HubServer]) -> None:
    """$upgrade on hub 2 is accepted by the agent on hub 1; the hub then asks for $stats until
    the upgrade section reaches a final state, and $status on either process reports it."""
    hub1, hub2 = pair
    credentials = await hub1.store.add_agent("lab")
    client = await SpecAgent.connected(hub1, credentials)
    agent_id = credentials.agent_id
    upgrade = asyncio.create_task(_http(hub2, "POST", f"/Agent/{agent_id}/$upgrade?version=2.0.0"))
    request = await client.recv_type("agent:upgrade:request")
    await client.send({"type": "agent:upgrade:response", "callback": request["callback"], "statusCode": 200})
    assert (await upgrade)[0] == 200
    states = iter(["switching", "completed"])
    for state in states:
        stats = await client.recv_type("agent:stats:request")
        section = {"state": state, "targetVersion": "2.0.0", "runningVersion": "1.0.0"}
        if state == "completed":
            section.update(fromVersion="1.0.0", switchedAt="2026-11-30T12:00:00Z", intakePauseS=0.02, error=None)
        await client.send({"type": "agent:stats:response", "callback": stats["callback"], "statusCode": 200,
                           "stats": {"upgrade": section, "queue": {}}})
    for hub in (hub1, hub2):
        await wait_for(lambda hub=hub: _upgrade_state(hub, agent_id, "completed"))
    _, text = await _http(hub1, "GET", f"/Agent/{agent_id}/$status")
    part = next(p for p in orjson.loads(text)["parameter"] if p["name"] == "upgrade")
    assert orjson.loads(part["valueString"]) == {"state": "completed", "targetVersion": "2.0.0", "fromVersion": "1.0.0",
                                                 "error": None, "switchedAt": "2026-11-30T12:00:00Z",
                                                 "intakePauseS": 0.02}
    await client.close()


async def _upgrade_state(hub: HubServer, agent_id: str, state: str) -> bool:
    _, text = await _http(hub, "GET", f"/Agent/{agent_id}/$status")
    parts = {p["name"]: p for p in orjson.loads(text)["parameter"]}
    return "upgrade" in parts and orjson.loads(parts["upgrade"]["valueString"])["state"] == state


async def test_healthz_reports_the_bus(pair: tuple[HubServer, HubServer]) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{pair[1].url}/healthz") as response:
        assert (await response.json())["bus"] == "ok"


async def test_revoking_tokens_from_the_cli_closes_the_connected_socket(tmp_path: Path, store_url: str | None) -> None:  # noqa: F811
    async with HubServer(hub_settings(tmp_path, store=store_url, heartbeat_interval_s=0.2)) as hub:
        credentials = await hub.store.add_agent("lab")
        client = await SpecAgent.connected(hub, credentials)
        client_done = asyncio.create_task(_answer_heartbeats_until_closed(client))
        store_args = ["--store", store_url] if store_url else []
        out = await asyncio.to_thread(  # another process, as an operator's shell would be
            subprocess.run, [sys.executable, "-m", "medagent", "hub", "revoke-tokens", "lab", "--data-dir",
                             str(hub.data_dir), *store_args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
            check=False)
        assert out.returncode == 0, out.stderr
        close_code = await asyncio.wait_for(client_done, 10)
        assert close_code == 1008  # policy violation: the token was revoked
        await wait_for(lambda: _connected(hub, credentials.agent_id, False))


async def _answer_heartbeats_until_closed(client: SpecAgent) -> int | None:
    from websockets.exceptions import ConnectionClosed

    try:
        while True:
            frame = await client.recv(timeout=10)
            if frame.get("type") == "agent:heartbeat:request":
                await client.send({"type": "agent:heartbeat:response", "version": "1.0.0"})
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


async def _connected(hub: HubServer, agent_id: str, expected: bool) -> bool:
    return (await hub.context.bus.presence(agent_id)).connected is expected


async def test_without_redis_operations_answer_503_and_inbound_carries_on(tmp_path: Path, postgres_url: str,  # noqa: F811
                                                                          own_redis_server: Any) -> None:  # noqa: F811
    settings = hub_settings(tmp_path, store=postgres_url, bus=f"{own_redis_server.url}?cluster=down")
    async with HubServer(settings) as hub:
        credentials = await hub.store.add_agent("lab")
        await hub.store.add_channel(credentials.agent_id, "adt", "mllp://0.0.0.0:2575")
        client = await SpecAgent.connected(hub, credentials)
        other = await hub.store.add_agent("elsewhere")
        own_redis_server.kill()
        await wait_for(lambda: not hub.context.bus.available)
        status, text = await _http(hub, "GET", f"/Agent/{other.agent_id}/$status")
        assert status == 503 and "bus unavailable" in text
        async with aiohttp.ClientSession() as http, http.get(f"{hub.url}/healthz") as response:
            assert response.status == 200 and (await response.json())["bus"] == "unavailable"
        await client.send(transmit("adt", adt("NOREDIS1"), "cb-noredis-1"))
        (reply,) = await client.responses(1)
        assert "MSA|AA|NOREDIS1" in reply["body"]
        await client.close()
