"""GET /messages: keyset paging and filters over messages sent through the real websocket."""

from __future__ import annotations

from typing import Any

import aiohttp
from hubtest import SpecAgent, adt, admin_headers, transmit

from medagent.hub import AgentCredentials, HubServer


async def _messages(hub: HubServer, **query: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{hub.url}/messages", params=query, headers=admin_headers(hub)) as response:
            return response.status, await response.json(content_type=None)


async def test_paging_and_filters(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    batch = [transmit("adt", adt(f"P{i:02d}"), f"page-{i}") for i in range(12)]
    batch.append(transmit("adt", adt("ORU1").replace("ADT^A01^ADT_A01", "ORU^R01^ORU_R01"), "oru-1"))
    batch.append(transmit("boom", adt("ERR9"), "err-1"))
    await client.send({"type": "agent:batch", "seq": 1, "messages": batch})
    await client.responses(14)

    callbacks: list[str] = []
    after = "0"
    for _ in range(10):
        status, page = await _messages(hub, agent=agent.agent_id, limit="5", after=after)
        assert status == 200 and len(page["messages"]) <= 5
        callbacks += [m["callback"] for m in page["messages"]]
        if page["next"] is None:
            break
        after = str(page["next"])
    assert len(callbacks) == 14 and len(set(callbacks)) == 14
    assert "body" not in page["messages"][0]

    status, page = await _messages(hub, type="ORU")
    assert [m["callback"] for m in page["messages"]] == ["oru-1"]
    status, page = await _messages(hub, control_id="P03", body="true")
    assert [m["body"] for m in page["messages"]] == [adt("P03")]
    status, page = await _messages(hub, channel="boom", status="error")
    [failed] = page["messages"]
    assert failed["callback"] == "err-1" and "KeyError" in failed["error"] and failed["reply_status"] == 400
    status, page = await _messages(hub, since="2000-01-01T00:00:00Z", until="2000-01-02T00:00:00Z")
    assert status == 200 and page["messages"] == []

    status, body = await _messages(hub, since="yesterday")
    assert status == 400 and "since" in body["issue"][0]["details"]["text"]
    status, body = await _messages(hub, status="weird")
    assert status == 400
    await client.close()


async def test_admin_endpoints_create_agents_and_channels(hub: HubServer) -> None:
    async with aiohttp.ClientSession(headers=admin_headers(hub)) as http:
        async with http.post(f"{hub.url}/admin/agents", json={"name": "made-over-http"}) as response:
            assert response.status == 201
            credentials = await response.json()
        assert set(credentials) == {"agent_id", "client_id", "client_secret"}
        url = f"{hub.url}/admin/agents/{credentials['agent_id']}/channels"
        async with http.post(url, json={"name": "adt", "address": "mllp://0.0.0.0:2575"}) as response:
            assert response.status == 201
            assert (await response.json())["name"] == "adt"
        async with http.post(url, json={"name": "bad", "address": "ftp://x"}) as response:
            assert response.status == 400
        async with http.put(f"{hub.url}/admin/agents/{credentials['agent_id']}/status", json={"status": "off"}) as response:
            assert response.status == 200 and (await response.json())["status"] == "off"
        async with http.get(f"{hub.url}/admin/agents") as response:
            [listed] = (await response.json())["agents"]
            assert listed["name"] == "made-over-http" and "client_secret" not in listed
