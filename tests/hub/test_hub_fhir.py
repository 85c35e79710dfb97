"""FHIR reads of an agent's configuration (spec §1.1, §3.1): own resources only."""

from __future__ import annotations

from typing import Any

import aiohttp
from hubtest import admin_headers, get_token

from medagent.hub import AgentCredentials, HubServer
from medagent.hub.fhir_json import BOT_CALLABLE_URL


async def _get(hub: HubServer, path: str, token: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{hub.url}/fhir/R4/{path}", headers={"Authorization": f"Bearer {token}"}) as response:
            return response.status, await response.json(content_type=None)


async def test_agent_reads_its_own_configuration(hub: HubServer, agent: AgentCredentials) -> None:
    await hub.store.set_agent_settings(agent.agent_id, {"keepAlive": True, "maxClientsPerRemote": 3})
    token = await get_token(hub, agent)
    status, resource = await _get(hub, f"Agent/{agent.agent_id}", token)
    assert status == 200
    assert (resource["resourceType"], resource["id"], resource["name"], resource["status"]) == (
        "Agent", agent.agent_id, "lab", "active")
    assert {"name": "keepAlive", "valueBoolean": True} in resource["setting"]
    assert {"name": "maxClientsPerRemote", "valueInteger": 3} in resource["setting"]
    [adt] = [c for c in resource["channel"] if c["name"] == "adt"]
    endpoint_ref, bot_ref = adt["endpoint"]["reference"], adt["targetReference"]["reference"]
    assert endpoint_ref.startswith("Endpoint/") and bot_ref.startswith("Bot/")

    status, endpoint = await _get(hub, endpoint_ref, token)
    assert status == 200
    assert endpoint["resourceType"] == "Endpoint" and endpoint["status"] == "active"
    assert endpoint["address"].startswith("mllp://0.0.0.0:") and endpoint["name"] == "adt"

    status, bot = await _get(hub, bot_ref, token)
    assert status == 200 and bot["resourceType"] == "Bot"
    assert bot["extension"] == [{"url": BOT_CALLABLE_URL, "valueString": "medagent.hub.bots.ack:handler"}]

    status, found = await _get(hub, "Agent?name=lab", token)
    assert status == 200 and found["resourceType"] == "Bundle" and found["total"] == 1
    assert found["entry"][0]["resource"]["id"] == agent.agent_id


async def test_agent_may_not_read_others(hub: HubServer, agent: AgentCredentials) -> None:
    other = await hub.store.add_agent("other")
    other_channel = await hub.store.add_channel(other.agent_id, "x", "mllp://0.0.0.0:3000", "hubtest_bots:only_for_other")
    token = await get_token(hub, agent)
    assert (await _get(hub, f"Agent/{other.agent_id}", token))[0] == 403
    assert (await _get(hub, f"Endpoint/{other_channel.id}", token))[0] == 403
    assert (await _get(hub, f"Bot/{other_channel.bot_id}", token))[0] == 403
    status, found = await _get(hub, "Agent?name=other", token)
    assert status == 200 and found["total"] == 0
    # the operator reads everything
    admin = admin_headers(hub)["Authorization"].split(" ", 1)[1]
    assert (await _get(hub, f"Agent/{other.agent_id}", admin))[0] == 200
    assert (await _get(hub, f"Endpoint/{other_channel.id}", admin))[0] == 200


async def test_missing_resources_are_404_operation_outcomes(hub: HubServer, agent: AgentCredentials) -> None:
    admin = admin_headers(hub)["Authorization"].split(" ", 1)[1]
    for path in ("Agent/nope", "Endpoint/nope", "Bot/nope", "Patient/nope"):
        status, body = await _get(hub, path, admin)
        assert status == 404 and body["resourceType"] == "OperationOutcome", path
    assert (await _get(hub, f"Agent/{agent.agent_id}", "not-a-token"))[0] == 401
