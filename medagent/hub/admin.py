"""Operator HTTP API (admin token) and the health probe.

* ``GET /healthz`` (no auth) -> ``{"status": "ok", "version", "agents_connected"}``
* ``GET /messages?agent=&channel=&type=&control_id=&status=&since=&until=&after=&limit=&body=``
  -> ``{"messages": [...], "next": <after> | null}``: one keyset page (``limit`` default 100,
  max 1000) oldest first; pass ``next`` as ``after`` for the next page. ``since``/``until`` are
  epoch milliseconds or ISO 8601 instants; ``type`` ``ADT`` matches every ADT, ``ADT^A01``
  exactly. Bodies (PHI) are included only with ``body=true``.
* ``GET /admin/agents``; ``POST /admin/agents {"name", "settings"?}`` -> 201 credentials (the
  secret is shown once); ``POST /admin/agents/{id}/channels {"name", "address", "bot"?}`` -> 201;
  ``PUT /admin/agents/{id}/status {"status": "active"|"off"}``.
* Revocation: ``POST /admin/agents/{id}/revoke-tokens`` -> ``{"agent_id", "token_generation",
  "connections_closed"}``; ``POST /admin/agents/{id}/secret`` -> 201 new credentials (the old
  secret stops working). Both, and setting an agent ``off``, refuse every token issued before on
  its next use and close the agent's open websockets (1008 policy violation), so it must log in
  again.

Query parameters are validated before use (issue 18, defect 5): a cursor, a limit or an instant
out of range is 400 with the reason, never an OverflowError deep in SQLite. :func:`message_query`
is the one parser of those values (raising :class:`BadQuery`), shared with the CLI.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
from typing import Any

import orjson
from aiohttp import web

from medagent import __version__
from medagent.hub.access import require_admin
from medagent.hub.context import CONNECTIONS_KEY, CTX_KEY
from medagent.hub.fhir_json import error_response
from medagent.hub.records import (
    AgentRecord,
    AgentStatus,
    ChannelRecord,
    MessageQuery,
    MessageRecord,
    MessageStatus,
)
from medagent.hub.store import DEFAULT_BOT, MAX_PAGE, NotFound, StoreError

__all__ = [
    "MAX_ID",
    "MAX_INSTANT_MS",
    "BadQuery",
    "add_admin_routes",
    "agent_json",
    "channel_json",
    "close_agent_connections",
    "message_json",
    "message_query",
    "parse_instant_ms",
    "parse_int",
]

log = logging.getLogger(__name__)

#: SQLite INTEGER is signed 64-bit: the largest message id (cursor) a query may name
MAX_ID = 2**63 - 1
#: instants are epoch ms up to 9999-12-31T23:59:59.999Z (what ISO 8601 can write in 4 digits)
MAX_INSTANT_MS = 253_402_300_799_999
#: the longest query value accepted (a number or an ISO 8601 instant is far shorter)
_MAX_VALUE_CHARS = 64


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class BadQuery(ValueError):
    """A query parameter that cannot be used; the message names it."""


def parse_instant_ms(value: str, name: str) -> int:
    """Epoch ms from ``"1700000000000"`` or an ISO 8601 instant (naive = UTC), 0..year 9999."""
    value = value.strip()
    if len(value) > _MAX_VALUE_CHARS:
        raise BadQuery(f"{name} is too long to be a time ({len(value)} characters)")
    if value.isdigit():  # isdigit() accepts other scripts' digits; int() then fails or is caught below
        try:
            instant = int(value)
        except ValueError:
            raise BadQuery(f"{name} must be epoch milliseconds or an ISO 8601 time, not {value!r}") from None
    else:
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=datetime.UTC)
            instant = int(moment.timestamp() * 1000)
        except (ValueError, OverflowError):
            raise BadQuery(f"{name} must be epoch milliseconds or an ISO 8601 time, not {value!r}") from None
    if not 0 <= instant <= MAX_INSTANT_MS:
        raise BadQuery(f"{name} is out of range: epoch milliseconds from 0 to {MAX_INSTANT_MS} (year 9999)")
    return instant


def parse_int(value: str | None, name: str, default: int, low: int, high: int) -> int:
    """An integer query value in ``low..high`` (``default`` when absent), else :class:`BadQuery`."""
    if value is None or value == "":
        return default
    text = value.strip()
    if len(text) > _MAX_VALUE_CHARS or not (text.isascii() and text.lstrip("-").isdigit()):
        raise BadQuery(f"{name} must be an integer, not {value[:_MAX_VALUE_CHARS]!r}")
    number = int(text)
    if not low <= number <= high:
        raise BadQuery(f"{name} is out of range: it must be from {low} to {high}, not {text}")
    return number


def message_query(query: Any) -> MessageQuery:
    """The :class:`MessageQuery` of ``/messages`` query parameters; :class:`BadQuery` names the bad one."""
    status = query.get("status")
    try:
        status_value = MessageStatus(status) if status else None
    except ValueError:
        raise BadQuery(f"status must be one of {', '.join(s.value for s in MessageStatus)}") from None
    return MessageQuery(
        agent_id=query.get("agent") or None,
        channel=query.get("channel") or None,
        message_type=query.get("type") or None,
        control_id=query.get("control_id") or None,
        since=parse_instant_ms(query["since"], "since") if query.get("since") else None,
        until=parse_instant_ms(query["until"], "until") if query.get("until") else None,
        status=status_value,
        after_id=parse_int(query.get("after"), "after", 0, 0, MAX_ID),
        limit=parse_int(query.get("limit"), "limit", 100, 1, MAX_PAGE),
        include_body=str(query.get("body", "")).lower() in ("1", "true", "yes"),
    )


def message_json(m: MessageRecord) -> dict[str, Any]:
    data = dataclasses.asdict(m)
    data["status"] = m.status.value
    if m.body is None:
        del data["body"]
        data.pop("reply_body")
    return data


def agent_json(a: AgentRecord) -> dict[str, Any]:
    return {"id": a.id, "name": a.name, "status": a.status.value, "client_id": a.client_id, "settings": a.settings}


def channel_json(c: ChannelRecord) -> dict[str, Any]:
    return {"id": c.id, "agent_id": c.agent_id, "name": c.name, "address": c.address, "bot_id": c.bot_id,
            "status": c.status.value}


async def healthz(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    # still 200 while the bus is down: inbound traffic and local agents work without Redis
    return _json({"status": "ok", "version": __version__, "agents_connected": len(ctx.registry),
                  "bus": "ok" if ctx.bus.available else "unavailable"})


async def list_messages(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    await require_admin(request)
    try:
        query = message_query(request.query)
        page = await ctx.store.query_messages(query)
    except (BadQuery, StoreError) as exc:
        return error_response(400, str(exc), "invalid")
    return _json({"messages": [message_json(m) for m in page.messages], "next": page.next_after_id})


async def list_agents(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    await require_admin(request)
    return _json({"agents": [agent_json(a) for a in await ctx.store.list_agents()]})


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadQuery("the request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise BadQuery("the request body must be a JSON object")
    return data


async def create_agent(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    await require_admin(request)
    try:
        data = await _body(request)
        name = data.get("name")
        if not isinstance(name, str):
            raise BadQuery("name is required")
        settings = data.get("settings") or {}
        if not isinstance(settings, dict):
            raise BadQuery("settings must be an object")
        credentials = await ctx.store.add_agent(name, settings)
    except (BadQuery, StoreError) as exc:
        return error_response(400, str(exc), "invalid")
    return _json(dataclasses.asdict(credentials), 201)


async def create_channel(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    await require_admin(request)
    agent_id = request.match_info["id"]
    try:
        data = await _body(request)
        name, address, bot = data.get("name"), data.get("address"), data.get("bot") or DEFAULT_BOT
        if not isinstance(name, str) or not isinstance(address, str) or not isinstance(bot, str):
            raise BadQuery("name and address are required strings; bot is an optional 'module:function'")
        channel = await ctx.store.add_channel(agent_id, name, address, bot)
    except NotFound as exc:
        return error_response(404, str(exc), "not-found")
    except (BadQuery, StoreError) as exc:
        return error_response(400, str(exc), "invalid")
    return _json(channel_json(channel), 201)


async def set_agent_status(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    await require_admin(request)
    agent_id = request.match_info["id"]
    try:
        data = await _body(request)
        try:
            status = AgentStatus(data.get("status"))
        except ValueError:
            raise BadQuery("status must be 'active' or 'off'") from None
        await ctx.store.set_agent_status(agent_id, status)  # "off" also revokes the agent's tokens
    except NotFound as exc:
        return error_response(404, str(exc), "not-found")
    except BadQuery as exc:
        return error_response(400, str(exc), "invalid")
    if status is AgentStatus.OFF:
        await close_agent_connections(request.app, agent_id, "agent set off")
    return _json(agent_json(await ctx.store.get_agent(agent_id)))


async def revoke_tokens(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    await require_admin(request)
    agent_id = request.match_info["id"]
    try:
        generation = await ctx.store.revoke_tokens(agent_id)
    except NotFound as exc:
        return error_response(404, str(exc), "not-found")
    closed = await close_agent_connections(request.app, agent_id, "tokens revoked")
    return _json({"agent_id": agent_id, "token_generation": generation, "connections_closed": closed})


async def rotate_secret(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    await require_admin(request)
    agent_id = request.match_info["id"]
    try:
        credentials = await ctx.store.reset_client_secret(agent_id)  # revokes tokens
    except NotFound as exc:
        return error_response(404, str(exc), "not-found")
    await close_agent_connections(request.app, agent_id, "client secret rotated")
    return _json(dataclasses.asdict(credentials), 201)


async def close_agent_connections(app: web.Application, agent_id: str, why: str) -> int:
    """Close every open websocket of ``agent_id`` (its tokens were revoked); returns how many."""
    connections = [c for c in app[CONNECTIONS_KEY] if c.agent_id == agent_id]
    await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
    if connections:
        log.info("agent %s: %d websocket(s) closed (%s)", agent_id, len(connections), why)
    return len(connections)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/messages", list_messages)
    app.router.add_get("/admin/agents", list_agents)
    app.router.add_post("/admin/agents", create_agent)
    app.router.add_post("/admin/agents/{id}/channels", create_channel)
    app.router.add_put("/admin/agents/{id}/status", set_agent_status)
    app.router.add_post("/admin/agents/{id}/revoke-tokens", revoke_tokens)
    app.router.add_post("/admin/agents/{id}/secret", rotate_secret)
