"""The FHIR R4 read subset an agent needs for its configuration, under ``/fhir/R4``.

* ``GET /fhir/R4/Agent/{id}``, ``GET /fhir/R4/Agent?name=…`` (Bundle ``searchset``)
* ``GET /fhir/R4/Endpoint/{id}``, ``GET /fhir/R4/Bot/{id}``
* ``GET /fhir/R4/Patient/{id}``, ``GET /fhir/R4/Patient?identifier=system|value`` (operator only;
  the resources the ``adt_to_patient`` bot keeps)

Access: the operator's admin token reads everything. An agent's access token reads its own
Agent, the Endpoints of its channels and the Bots they use — anything else is 403. A missing
resource is 404 with an OperationOutcome, as in Medplum.
"""

from __future__ import annotations

from aiohttp import web

from medagent.hub.access import principal, require_admin
from medagent.hub.context import CTX_KEY
from medagent.hub.fhir_json import (
    agent_resource,
    bot_resource,
    bundle,
    endpoint_resource,
    error_response,
    fhir_response,
)
from medagent.hub.store import NotFound

__all__ = ["FHIR_BASE", "add_fhir_routes"]

FHIR_BASE = "/fhir/R4"


def _forbidden(what: str) -> web.Response:
    return error_response(403, f"This agent's token may not read {what}", "forbidden")


async def read_agent(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    caller = await principal(request)
    agent_id = request.match_info["id"]
    if not caller.may_read_agent(agent_id):
        return _forbidden(f"Agent/{agent_id}")
    try:
        agent = await ctx.store.get_agent(agent_id)
    except NotFound:
        return error_response(404, f"Agent/{agent_id} not found", "not-found")
    return fhir_response(agent_resource(agent, await ctx.store.list_channels(agent_id)))


async def search_agents(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    caller = await principal(request)
    agents = await ctx.store.list_agents(request.query.get("name"))
    visible = [a for a in agents if caller.may_read_agent(a.id)]
    return fhir_response(bundle([agent_resource(a, await ctx.store.list_channels(a.id)) for a in visible]))


async def read_endpoint(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    caller = await principal(request)
    endpoint_id = request.match_info["id"]
    try:
        channel = await ctx.store.get_channel(endpoint_id)
    except NotFound:
        return error_response(404, f"Endpoint/{endpoint_id} not found", "not-found")
    if not caller.may_read_agent(channel.agent_id):
        return _forbidden(f"Endpoint/{endpoint_id}")
    return fhir_response(endpoint_resource(channel))


async def read_bot(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    caller = await principal(request)
    bot_id = request.match_info["id"]
    try:
        bot = await ctx.store.get_bot(bot_id)
    except NotFound:
        return error_response(404, f"Bot/{bot_id} not found", "not-found")
    if caller.agent_id is not None and all(c.bot_id != bot_id for c in await ctx.store.list_channels(caller.agent_id)):
        return _forbidden(f"Bot/{bot_id}")
    return fhir_response(bot_resource(bot))


async def read_patient(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    await require_admin(request)
    patient_id = request.match_info["id"]
    try:
        record = await ctx.store.get_resource("Patient", patient_id)
    except NotFound:
        return error_response(404, f"Patient/{patient_id} not found", "not-found")
    return fhir_response(record.resource)


async def search_patients(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    await require_admin(request)
    records = await ctx.store.find_resources("Patient", request.query.get("identifier"))
    return fhir_response(bundle([r.resource for r in records]))


def add_fhir_routes(app: web.Application) -> None:
    app.router.add_get(f"{FHIR_BASE}/Agent", search_agents)
    app.router.add_get(f"{FHIR_BASE}/Agent/{{id}}", read_agent)
    app.router.add_get(f"{FHIR_BASE}/Endpoint/{{id}}", read_endpoint)
    app.router.add_get(f"{FHIR_BASE}/Bot/{{id}}", read_bot)
    app.router.add_get(f"{FHIR_BASE}/Patient", search_patients)
    app.router.add_get(f"{FHIR_BASE}/Patient/{{id}}", read_patient)
