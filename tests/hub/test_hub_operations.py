"""Agent operations over HTTP (spec §7); the test plays the agent on a real websocket."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from hubtest import SpecAgent, admin_headers, adt

from medagent.hub import AgentCredentials, AgentStatus, HubServer

DESTINATION = "mllp://10.1.2.50:2575?encoding=utf-8"


async def _http(hub: HubServer, method: str, path: str, **kwargs: Any) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"{hub.url}{path}", headers=admin_headers(hub), **kwargs) as response:
            return response.status, response.content_type, await response.text()


async def test_push_round_trip_with_wait(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    body = adt("OUT1")
    call = asyncio.create_task(_http(hub, "POST", f"/fhir/R4/Agent/{agent.agent_id}/$push", json={
        "destination": DESTINATION, "contentType": "x-application/hl7-v2+er7", "body": body,
        "waitForResponse": True, "waitTimeout": 5000}))
    request = await client.recv_type("agent:transmit:request")
    assert request["remote"] == DESTINATION
    assert request["body"] == body
    assert request["contentType"] == "x-application/hl7-v2+er7"
    assert request["callback"].startswith(f"Agent/{agent.agent_id}-")
    assert "channel" not in request
    await client.send({"type": "agent:transmit:response", "remote": DESTINATION, "callback": request["callback"],
                       "contentType": "x-application/hl7-v2+er7", "statusCode": 200, "body": "MSA|AA|OUT1"})
    status, content_type, text = await call
    assert (status, content_type, text) == (200, "x-application/hl7-v2+er7", "MSA|AA|OUT1")
    await client.close()


async def test_push_with_parameters_body_at_root_and_agent_error(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    parameters = {"resourceType": "Parameters", "parameter": [
        {"name": "destination", "valueUrl": DESTINATION},
        {"name": "contentType", "valueString": "x-application/hl7-v2+er7"},
        {"name": "body", "valueString": adt("OUT2")},
        {"name": "waitForResponse", "valueBoolean": True},
    ]}
    call = asyncio.create_task(_http(hub, "POST", f"/Agent/{agent.agent_id}/$push", json=parameters))
    request = await client.recv_type("agent:transmit:request")
    await client.send({"type": "agent:error", "body": "Connection refused", "callback": request["callback"]})
    status, _, text = await call
    assert status == 400 and "Connection refused" in text and "OperationOutcome" in text
    await client.close()


async def test_push_without_wait_and_timeout(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    push = {"destination": DESTINATION, "contentType": "x-application/hl7-v2+er7", "body": adt("OUT3")}
    status, _, text = await _http(hub, "POST", f"/Agent/{agent.agent_id}/$push", json=push)
    assert status == 200 and "All OK" in text
    request = await client.recv_type("agent:transmit:request")
    assert "callback" not in request

    status, _, text = await _http(hub, "POST", f"/Agent/{agent.agent_id}/$push",
                                  json={**push, "waitForResponse": True, "waitTimeout": 100})
    assert status == 400 and "Timeout" in text
    # a late reply for the expired callback is dropped quietly
    late = await client.recv_type("agent:transmit:request")
    await client.send({"type": "agent:transmit:response", "remote": DESTINATION, "callback": late["callback"],
                       "contentType": "text/plain", "body": "late"})
    await client.send({"type": "agent:heartbeat:request"})
    await client.recv_type("agent:heartbeat:response")
    await client.close()


async def test_push_errors(hub: HubServer, agent: AgentCredentials) -> None:
    push = {"destination": DESTINATION, "contentType": "x-application/hl7-v2+er7", "body": adt("OUT4")}
    status, _, text = await _http(hub, "POST", f"/Agent/{agent.agent_id}/$push", json=push)
    assert status == 400 and "Agent not connected" in text
    status, _, _ = await _http(hub, "POST", "/Agent/no-such-agent/$push", json=push)
    assert status == 404
    status, _, text = await _http(hub, "POST", f"/Agent/{agent.agent_id}/$push", json={**push, "destination": "Device/1"})
    assert status == 400 and "Device" in text
    status, _, text = await _http(hub, "POST", f"/Agent/{agent.agent_id}/$push", json={**push, "waitTimeout": 60000})
    assert status == 400 and "55000" in text
    await hub.store.set_agent_status(agent.agent_id, AgentStatus.OFF)
    status, _, text = await _http(hub, "POST", f"/Agent/{agent.agent_id}/$push", json=push)
    assert status == 400 and "Agent.status is currently set to off" in text
    status, _, _ = await _http(hub, "GET", f"/Agent/{agent.agent_id}/$push")
    assert status == 405
    status, _, _ = await _http(hub, "GET", f"/Agent/{agent.agent_id}/$nope")
    assert status == 404


async def test_status(hub: HubServer, agent: AgentCredentials) -> None:
    def value(parameters: dict[str, Any], name: str) -> Any:
        [entry] = [p for p in parameters["parameter"] if p["name"] == name]
        return next(v for k, v in entry.items() if k.startswith("value"))

    status, _, text = await _http(hub, "GET", f"/fhir/R4/Agent/{agent.agent_id}/$status")
    assert status == 200


    parameters = orjson.loads(text)
    assert value(parameters, "status") == "disconnected" and value(parameters, "version") == "unknown"

    client = await SpecAgent.connected(hub, agent)
    await client.send({"type": "agent:heartbeat:response", "version": "1.2.3"})
    await client.send({"type": "agent:heartbeat:request"})
    await client.recv_type("agent:heartbeat:response")
    parameters = orjson.loads((await _http(hub, "GET", f"/Agent/{agent.agent_id}/$status"))[2])
    assert value(parameters, "status") == "connected"
    assert value(parameters, "version") == "1.2.3"
    assert value(parameters, "lastUpdated").endswith("Z")
    await client.close()


async def test_reload_config_upgrade_logs_stats_are_routed(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    base = f"/fhir/R4/Agent/{agent.agent_id}"

    call = asyncio.create_task(_http(hub, "POST", f"{base}/$reload-config"))
    request = await client.recv_type("agent:reloadconfig:request")
    await client.send({"type": "agent:reloadconfig:response", "statusCode": 200, "callback": request["callback"]})
    status, _, text = await call
    assert status == 200 and "All OK" in text

    call = asyncio.create_task(_http(hub, "GET", f"{base}/$upgrade?version=1.2.3&force=true"))
    request = await client.recv_type("agent:upgrade:request")
    assert (request["version"], request["force"]) == ("1.2.3", True)
    await client.send({"type": "agent:error", "body": "upgrade not supported", "callback": request["callback"]})
    status, _, text = await call
    assert status == 400 and "upgrade not supported" in text

    call = asyncio.create_task(_http(hub, "GET", f"{base}/$fetch-logs?limit=2"))
    request = await client.recv_type("agent:logs:request")
    assert request["limit"] == 2
    await client.send({"type": "agent:logs:response", "statusCode": 200, "callback": request["callback"],
                       "logs": [{"level": "INFO", "msg": "one"}, {"level": "WARN", "msg": "two"}]})
    status, _, text = await call
    assert status == 200


    [logs] = orjson.loads(text)["parameter"]
    assert logs["valueString"].split("\n") == ['{"level":"INFO","msg":"one"}', '{"level":"WARN","msg":"two"}']

    call = asyncio.create_task(_http(hub, "GET", f"{base}/$stats"))
    request = await client.recv_type("agent:stats:request")
    await client.send({"type": "agent:stats:response", "statusCode": 200, "callback": request["callback"],
                       "stats": {"live": True}})
    status, _, text = await call
    assert status == 200 and orjson.loads(orjson.loads(text)["parameter"][0]["valueString"]) == {"live": True}

    call = asyncio.create_task(_http(hub, "GET", f"{base}/$reload-config?timeout=100"))
    await client.recv_type("agent:reloadconfig:request")
    status, _, text = await call
    assert status == 400 and "Timeout" in text
    await client.close()


async def test_bulk_status_searches_agents_in_medplums_shape(hub: HubServer, agent: AgentCredentials) -> None:
    other = await hub.store.add_agent("radiology")
    await hub.store.set_agent_status(other.agent_id, AgentStatus.OFF)
    client = await SpecAgent.connected(hub, agent)
    await client.send({"type": "agent:heartbeat:request"})  # nothing is needed for presence, but be sure it is seen
    await client.recv_type("agent:heartbeat:response")
    for prefix in ("/fhir/R4", ""):
        status, _, text = await _http(hub, "GET", f"{prefix}/Agent/$bulk-status")
        assert status == 200, text
        bundle = orjson.loads(text)
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
        results = {}
        for entry in bundle["entry"]:
            params = {p["name"]: p["resource"] for p in entry["resource"]["parameter"]}
            assert params["agent"]["resourceType"] == "Agent"
            values = {p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in params["result"]["parameter"]}
            results[params["agent"]["name"]] = values["status"]
        assert results == {"lab": "connected", "radiology": "disconnected"}
    status, _, text = await _http(hub, "GET", "/Agent/$bulk-status", params={"name": "RAD"})
    assert [e["resource"]["parameter"][0]["resource"]["name"] for e in orjson.loads(text)["entry"]] == ["radiology"]
    status, _, text = await _http(hub, "GET", "/Agent/$bulk-status", params={"status": "active", "_count": "1"})
    assert [e["resource"]["parameter"][0]["resource"]["name"] for e in orjson.loads(text)["entry"]] == ["lab"]
    status, _, text = await _http(hub, "GET", "/Agent/$bulk-status", params={"_count": "101"})
    assert status == 400 and "_count" in text
    status, _, text = await _http(hub, "GET", "/Agent/$bulk-status", params={"colour": "red"})
    assert status == 400 and "colour" in text
    async with aiohttp.ClientSession() as http, http.get(f"{hub.url}/Agent/$bulk-status") as response:
        assert response.status == 401
    await client.close()


async def test_stats_waits_medplums_five_seconds_by_default(hub: HubServer, agent: AgentCredentials) -> None:
    """The agent never answers: the operation ends with "Timeout", and the timeout is 5000 ms
    (checked by the bound the parameter accepts and by the default's value, not by a clock)."""
    from medagent.hub.operations import _QUERY_TIMEOUT, _RELOAD_TIMEOUT

    assert _QUERY_TIMEOUT.seconds(None, "timeout") == 5.0 and _RELOAD_TIMEOUT.seconds(None, "timeout") == 5.0
    client = await SpecAgent.connected(hub, agent)
    status, _, text = await _http(hub, "GET", f"/Agent/{agent.agent_id}/$stats", params={"timeout": "50"})
    assert status == 400 and "Timeout" in text
    await client.close()
