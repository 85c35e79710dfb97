"""Agent operations over HTTP (medplum-protocol.md §7), under ``/fhir/R4`` and at the root.

``/Agent/{id}/$push``, ``$status``, ``$reload-config``, ``$upgrade``, ``$fetch-logs``, ``$stats``.
All require the admin token. An operation that needs the agent sends one request frame with a
fresh callback (``Agent/<id>-<uuid>``) through the hub's bus (:mod:`medagent.hub.bus`) to the
process holding the agent's socket — this one, or another hub process over Redis — and waits, up
to its timeout, for the frame that echoes it. On the holding process :func:`deliver_local` puts
the frame on the socket and waits for the echo (:class:`~medagent.hub.registry.PendingReplies`).
Presence (``$status``, ``$bulk-status``, ``/metrics``) is the bus's, so every process answers
alike:

* ``$push`` (POST; JSON or ``Parameters``: ``destination`` — an ``mllp://…`` URL or, for ping, a
  host — ``contentType``, ``body``, ``waitForResponse``, ``waitTimeout`` ms, default 10000, max
  55000) sends ``agent:transmit:request {remote: destination}``. Without waiting: 200 allOk.
  Waiting: the agent's reply *raw* (its status code, content type and body); ``agent:error`` or
  a status >= 400 -> 400 OperationOutcome with the text; no reply in time -> 400 "Timeout".
  ``Device/…`` destinations are refused (this hub stores no Devices).
* ``$status`` (GET) -> ``Parameters{status connected|disconnected, version, lastUpdated}``, and
  ``upgrade`` (valueString, JSON ``{state, targetVersion, fromVersion, error, switchedAt,
  intakePauseS}``) once an upgrade was seen (:mod:`medagent.hub.upgrades`); no frame is sent. ``/Agent/$bulk-status`` (GET, type level) takes Medplum's Agent search
  parameters (``name``, ``status``, ``_count`` <= 100, default 20; ``identifier`` and ``_tag``
  match nothing here, since this hub's agents carry neither) and answers
  ``Bundle{type: collection}`` of ``Parameters{agent: Agent, result: Parameters}``
  (agentbulkstatus.ts / agentutils.ts ``handleBulkAgentOperation``).
* ``$reload-config`` (GET/POST, ``timeout`` ms default 5000, max 55000) and ``$upgrade``
  (GET/POST, ``version``, ``force``, ``timeout`` default 45000, max 56000) -> allOk, or 400
  with the agent's error.
* ``$fetch-logs`` (GET, ``limit``) -> ``Parameters{logs: valueString}``, one JSON log entry per
  line; ``$stats`` (GET) -> ``Parameters{stats: valueString}``, the stats object as JSON. Both
  wait Medplum's 5 s by default (``publishAgentRequest``'s ``timeout ?? 5000``).
* ``/releases...`` (any valid token): the release registry agents upgrade from (hub.releases).
* ``GET /metrics`` (admin token, as a Prometheus ``bearer_token``): the hub's own figures in
  the Prometheus text format (medagent.ops.metrics.hub_families).

Common errors: unknown agent 404; agent not connected 400 "Agent not connected"; an unknown
operation 404; a wrong method 405; the bus (Redis) unreachable 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from medagent.cloud.messages import (
    CONTENT_TYPE_PING,
    AgentMessage,
    ErrorMessage,
    LogsRequest,
    LogsResponse,
    ReloadConfigRequest,
    StatsRequest,
    StatsResponse,
    TransmitRequest,
    TransmitResponse,
    UpgradeRequest,
    new_callback,
)
from medagent.hub.access import require_admin
from medagent.hub.bus import AgentNotConnected, AgentTimeout, BusError, BusUnavailable, Presence
from medagent.hub.context import CTX_KEY, HubContext
from medagent.hub.fhir_json import (
    agent_resource,
    all_ok,
    bundle,
    error_response,
    fhir_response,
    iso_instant,
    parameters,
    parameters_to_dict,
)
from medagent.hub.intake import AGENT_OFF_ERROR
from medagent.hub.records import AgentRecord, AgentStatus
from medagent.hub.releases import add_release_routes
from medagent.hub.store import NotFound
from medagent.ops.metrics import hub_families, metrics_response

__all__ = ["OperationError", "add_operation_routes", "deliver_local", "presences_or_unknown"]

AGENT_NOT_CONNECTED = "Agent not connected"
TIMEOUT = "Timeout"


class OperationError(Exception):
    """An operation that ends with an OperationOutcome error response."""

    def __init__(self, status: int, text: str, code: str = "processing") -> None:
        super().__init__(text)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class _Timeout:
    default_ms: int
    max_ms: int

    def seconds(self, value: Any, name: str) -> float:
        if value is None or value == "":
            return self.default_ms / 1000
        try:
            ms = int(value)
        except (TypeError, ValueError):
            raise OperationError(400, f"{name} must be an integer number of milliseconds") from None
        if not 0 < ms <= self.max_ms:
            raise OperationError(400, f"{name} must be between 1 and {self.max_ms} ms")
        return ms / 1000


_PUSH_TIMEOUT = _Timeout(10_000, 55_000)
# Medplum's publishAgentRequest waits `timeout ?? 5000` ms; only $upgrade and $push set their own.
_RELOAD_TIMEOUT = _Timeout(5_000, 55_000)
_UPGRADE_TIMEOUT = _Timeout(45_000, 56_000)
_QUERY_TIMEOUT = _Timeout(5_000, 55_000)
BULK_DEFAULT_COUNT = 20
BULK_MAX_COUNT = 100


async def _params(request: web.Request) -> dict[str, Any]:
    """Query parameters, overlaid with a JSON body (plain object or ``Parameters``)."""
    params: dict[str, Any] = dict(request.query)
    if request.method == "POST" and request.can_read_body:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise OperationError(400, "the request body must be JSON (an object or a Parameters resource)") from None
        if not isinstance(body, dict):
            raise OperationError(400, "the request body must be a JSON object or a Parameters resource")
        params.update(parameters_to_dict(body) if body.get("resourceType") == "Parameters" else body)
    return params


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("true", "1", "yes"))


async def deliver_local(ctx: HubContext, agent_id: str, message: AgentMessage,
                        timeout_s: float | None) -> AgentMessage | None:
    """The bus's deliver handler: put ``message`` on this process's socket of the agent and, with
    a timeout, wait for the frame that echoes its callback (TimeoutError when none comes)."""
    connection = ctx.registry.current(agent_id)
    if connection is None:
        raise AgentNotConnected(agent_id)
    try:
        if timeout_s is None:
            await connection.send(message)
            return None
        callback = message.callback  # type: ignore[attr-defined]
        reply = ctx.pending.expect(callback)
        try:
            await connection.send(message)
            return await asyncio.wait_for(reply, timeout_s)
        finally:
            ctx.pending.forget(callback)
    except (ConnectionError, RuntimeError):
        raise AgentNotConnected(agent_id) from None


@contextmanager
def _bus_errors() -> Iterator[None]:
    """The bus's error contract as OperationOutcomes (Medplum's texts for the agent's two)."""
    try:
        yield
    except AgentNotConnected:
        raise OperationError(400, AGENT_NOT_CONNECTED) from None
    except AgentTimeout:
        raise OperationError(400, TIMEOUT, "timeout") from None
    except BusUnavailable:
        raise OperationError(503, "The hub cannot reach the agent's hub process (bus unavailable); try again",
                             "transient") from None
    except BusError as exc:
        raise OperationError(502, str(exc), "transient") from None


async def presences_or_unknown(ctx: HubContext, agent_ids: list[str]) -> dict[str, Presence]:
    """Presence for pages that must render while the bus is down (the dashboard): an agent
    whose presence cannot be read shows disconnected, with nothing known."""
    try:
        return await ctx.bus.presence_many(agent_ids)
    except BusError:
        return {agent_id: Presence(False) for agent_id in agent_ids}


async def _ask(ctx: HubContext, agent_id: str, make: Callable[[str], AgentMessage], timeout_s: float) -> AgentMessage:
    """Send the request built by ``make(callback)`` and wait for the frame echoing the callback."""
    with _bus_errors():
        return await ctx.bus.request(agent_id, make(new_callback(agent_id)), timeout_s)


def _fail_on_error(reply: AgentMessage) -> None:
    if isinstance(reply, ErrorMessage):
        raise OperationError(400, reply.body)
    status = getattr(reply, "status_code", None)
    if status is not None and status >= 400:
        raise OperationError(400, getattr(reply, "body", None) or f"the agent answered with status {status}")


async def op_push(ctx: HubContext, agent_id: str, params: Mapping[str, Any]) -> web.StreamResponse:
    destination, content_type, body = params.get("destination"), params.get("contentType"), params.get("body")
    if not isinstance(destination, str) or not destination:
        raise OperationError(400, "destination is required: an mllp://host:port URL, or a host for a ping")
    if destination.startswith(("Device/", "Device?")):
        raise OperationError(400, "this hub stores no Device resources; pass the destination URL (mllp://host:port) itself")
    if not isinstance(content_type, str) or not content_type:
        raise OperationError(400, "contentType is required (e.g. x-application/hl7-v2+er7)")
    if not isinstance(body, str):
        raise OperationError(400, "body is required and must be a string")
    wait = _truthy(params.get("waitForResponse"))
    timeout_s = _PUSH_TIMEOUT.seconds(params.get("waitTimeout"), "waitTimeout")
    if (await ctx.store.get_agent(agent_id)).status is not AgentStatus.ACTIVE and content_type != CONTENT_TYPE_PING:
        raise OperationError(400, AGENT_OFF_ERROR)

    def request(callback: str | None) -> TransmitRequest:
        return TransmitRequest(remote=destination, content_type=content_type, body=body, callback=callback)

    if not wait:
        with _bus_errors():
            await ctx.bus.send(agent_id, request(None))
        return all_ok()
    reply = await _ask(ctx, agent_id, request, timeout_s)
    _fail_on_error(reply)
    if not isinstance(reply, TransmitResponse):
        raise OperationError(400, f"the agent answered with {reply.TYPE}")
    return web.Response(text=reply.body, status=reply.status_code or 200, content_type=reply.content_type)


def _status_parameters(presence: Presence, upgrade: str | None) -> dict[str, Any]:
    values: dict[str, tuple[str, Any]] = {
        "status": ("valueCode", "connected" if presence.connected else "disconnected"),
        "version": ("valueString", presence.version or "unknown"),
    }
    if presence.last_updated is not None:
        values["lastUpdated"] = ("valueInstant", iso_instant(presence.last_updated))
    if upgrade is not None:
        values["upgrade"] = ("valueString", upgrade)
    return parameters(**values)


async def op_status(ctx: HubContext, agent_id: str, params: Mapping[str, Any]) -> web.StreamResponse:
    await ctx.store.get_agent(agent_id)
    with _bus_errors():
        presence = await ctx.bus.presence(agent_id)
    return fhir_response(_status_parameters(presence, await ctx.upgrades.latest(agent_id)))


async def _search_agents(ctx: HubContext, query: Mapping[str, str]) -> list[AgentRecord]:
    """Medplum's Agent search parameters that this hub can answer (name, status, _count)."""
    known = {"name", "status", "identifier", "_tag", "_count"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise OperationError(400, f"unknown Agent search parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    count_text = query.get("_count")
    try:
        count = int(count_text) if count_text not in (None, "") else BULK_DEFAULT_COUNT
    except ValueError:
        raise OperationError(400, "_count must be an integer") from None
    if not 0 < count <= BULK_MAX_COUNT:
        raise OperationError(400, f"_count must be between 1 and {BULK_MAX_COUNT}")
    if query.get("identifier") or query.get("_tag"):
        return []  # this hub's agents carry no identifiers or tags
    name = query.get("name")
    agents = [a for a in await ctx.store.list_agents()
              if name is None or a.name.lower().startswith(name.lower())]  # FHIR string search: prefix, any case
    status = query.get("status")
    if status:
        agents = [a for a in agents if a.status.value in status.split(",")]
    return agents[:count]


async def op_bulk_status(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX_KEY]
    await require_admin(request)
    try:
        agents = await _search_agents(ctx, request.query)
    except OperationError as exc:
        return error_response(exc.status, str(exc), exc.code)
    try:
        with _bus_errors():
            presences = await ctx.bus.presence_many([a.id for a in agents])
    except OperationError as exc:
        return error_response(exc.status, str(exc), exc.code)
    entries = [parameters(agent=("resource", agent_resource(a, await ctx.store.list_channels(a.id))),
                          result=("resource", _status_parameters(presences[a.id], await ctx.upgrades.latest(a.id))))
               for a in agents]
    return fhir_response(bundle(entries, "collection"))


async def hub_metrics(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX_KEY]
    await require_admin(request)
    by_status: dict[str, int] = {}
    versions: dict[str, int] = {}
    connected = 0
    agents = await ctx.store.list_agents()
    try:
        with _bus_errors():
            presences = await ctx.bus.presence_many([a.id for a in agents])
    except OperationError as exc:
        return error_response(exc.status, str(exc), exc.code)
    for agent in agents:
        by_status[agent.status.value] = by_status.get(agent.status.value, 0) + 1
        presence = presences[agent.id]
        if presence.connected:
            connected += 1
            versions[presence.version or "unknown"] = versions.get(presence.version or "unknown", 0) + 1
    return metrics_response(hub_families(connected, by_status, versions))


async def op_reload_config(ctx: HubContext, agent_id: str, params: Mapping[str, Any]) -> web.StreamResponse:
    timeout_s = _RELOAD_TIMEOUT.seconds(params.get("timeout"), "timeout")
    await ctx.store.get_agent(agent_id)
    _fail_on_error(await _ask(ctx, agent_id, lambda cb: ReloadConfigRequest(cb), timeout_s))
    return all_ok()


async def op_upgrade(ctx: HubContext, agent_id: str, params: Mapping[str, Any]) -> web.StreamResponse:
    timeout_s = _UPGRADE_TIMEOUT.seconds(params.get("timeout"), "timeout")
    version = params.get("version")
    force = _truthy(params.get("force")) if params.get("force") is not None else None
    await ctx.store.get_agent(agent_id)
    request = lambda cb: UpgradeRequest(version=str(version) if version else None, force=force, callback=cb)
    _fail_on_error(await _ask(ctx, agent_id, request, timeout_s))
    ctx.upgrades.watch(agent_id)  # accepted: follow it to its outcome
    return all_ok()


async def op_fetch_logs(ctx: HubContext, agent_id: str, params: Mapping[str, Any]) -> web.StreamResponse:
    limit_text = params.get("limit")
    try:
        limit = int(limit_text) if limit_text not in (None, "") else None
    except (TypeError, ValueError):
        raise OperationError(400, "limit must be an integer") from None
    timeout_s = _QUERY_TIMEOUT.seconds(params.get("timeout"), "timeout")
    await ctx.store.get_agent(agent_id)
    reply = await _ask(ctx, agent_id, lambda cb: LogsRequest(limit=limit, callback=cb), timeout_s)
    _fail_on_error(reply)
    if not isinstance(reply, LogsResponse):
        raise OperationError(400, f"the agent answered with {reply.TYPE}")
    logs = "\n".join(orjson.dumps(entry).decode() for entry in reply.logs)
    return fhir_response(parameters(logs=("valueString", logs)))


async def op_stats(ctx: HubContext, agent_id: str, params: Mapping[str, Any]) -> web.StreamResponse:
    timeout_s = _QUERY_TIMEOUT.seconds(params.get("timeout"), "timeout")
    await ctx.store.get_agent(agent_id)
    reply = await _ask(ctx, agent_id, lambda cb: StatsRequest(cb), timeout_s)
    _fail_on_error(reply)
    if not isinstance(reply, StatsResponse):
        raise OperationError(400, f"the agent answered with {reply.TYPE}")
    await ctx.upgrades.record(agent_id, reply.stats)
    return fhir_response(parameters(stats=("valueString", orjson.dumps(reply.stats).decode())))


_Operation = Callable[[HubContext, str, Mapping[str, Any]], Any]

#: operation name -> (allowed methods, handler)
OPERATIONS: dict[str, tuple[frozenset[str], _Operation]] = {
    "$push": (frozenset({"POST"}), op_push),
    "$status": (frozenset({"GET"}), op_status),
    "$reload-config": (frozenset({"GET", "POST"}), op_reload_config),
    "$upgrade": (frozenset({"GET", "POST"}), op_upgrade),
    "$fetch-logs": (frozenset({"GET"}), op_fetch_logs),
    "$stats": (frozenset({"GET"}), op_stats),
}


async def agent_operation(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX_KEY]
    await require_admin(request)
    name, agent_id = request.match_info["operation"], request.match_info["id"]
    entry = OPERATIONS.get(name)
    if entry is None:
        return error_response(404, f"Unknown Agent operation {name!r}; known: {', '.join(OPERATIONS)}", "not-supported")
    methods, handler = entry
    if request.method not in methods:
        return error_response(405, f"{name} accepts {' or '.join(sorted(methods))}", "not-supported")
    try:
        return await handler(ctx, agent_id, await _params(request))
    except NotFound:
        return error_response(404, f"Agent/{agent_id} not found", "not-found")
    except OperationError as exc:
        return error_response(exc.status, str(exc), exc.code)


def add_operation_routes(app: web.Application, prefixes: tuple[str, ...] = ("/fhir/R4", "")) -> None:
    for prefix in prefixes:
        # A plain path beats /Agent/{id} in aiohttp's resolver (the most explicit match wins).
        app.router.add_get(f"{prefix}/Agent/$bulk-status", op_bulk_status)
        app.router.add_route("GET", f"{prefix}/Agent/{{id}}/{{operation}}", agent_operation)
        app.router.add_route("POST", f"{prefix}/Agent/{{id}}/{{operation}}", agent_operation)
    app.router.add_get("/metrics", hub_metrics)
    add_release_routes(app, app[CTX_KEY].settings.data_dir)
