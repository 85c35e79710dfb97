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
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from typing import Any

import orjson
from aiohttp import web

from medagent import __version__
from medagent.hub.access import require_admin
from medagent.hub.context import CTX_KEY
from medagent.hub.fhir_json import error_response
from medagent.hub.records import AgentRecord, AgentStatus, ChannelRecord, MessageQuery, MessageRecord, MessageStatus
from medagent.hub.store import DEFAULT_BOT, NotFound, StoreError

__all__ = ["add_admin_routes", "parse_instant_ms", "message_json", "agent_json", "channel_json"]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class BadQuery(ValueError):
    """A query parameter that cannot be used; the message names it."""


def parse_instant_ms(value: str, name: str) -> int:
    """Epoch ms from ``"1700000000000"`` or an ISO 8601 instant (naive = UTC)."""
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadQuery(f"{name} must be epoch milliseconds or an ISO 8601 time, not {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1000)


def _int(query: Any, name: str, default: int) -> int:
    value = query.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise BadQuery(f"{name} must be an integer, not {value!r}") from None


def message_query(query: Any) -> MessageQuery:
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
        after_id=_int(query, "after", 0),
        limit=_int(query, "limit", 100),
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
    return _json({"status": "ok", "version": __version__, "agents_connected": len(ctx.registry)})


async def list_messages(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    require_admin(request)
    try:
        query = message_query(request.query)
    except BadQuery as exc:
        return error_response(400, str(exc), "invalid")
    page = await asyncio.to_thread(ctx.store.query_messages, query)
    return _json({"messages": [message_json(m) for m in page.messages], "next": page.next_after_id})


async def list_agents(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    require_admin(request)
    return _json({"agents": [agent_json(a) for a in ctx.store.list_agents()]})


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
    require_admin(request)
    try:
        data = await _body(request)
        name = data.get("name")
        if not isinstance(name, str):
            raise BadQuery("name is required")
        settings = data.get("settings") or {}
        if not isinstance(settings, dict):
            raise BadQuery("settings must be an object")
        credentials = await asyncio.to_thread(ctx.store.add_agent, name, settings)
    except (BadQuery, StoreError) as exc:
        return error_response(400, str(exc), "invalid")
    return _json(dataclasses.asdict(credentials), 201)


async def create_channel(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    require_admin(request)
    agent_id = request.match_info["id"]
    try:
        data = await _body(request)
        name, address, bot = data.get("name"), data.get("address"), data.get("bot") or DEFAULT_BOT
        if not isinstance(name, str) or not isinstance(address, str) or not isinstance(bot, str):
            raise BadQuery("name and address are required strings; bot is an optional 'module:function'")
        channel = ctx.store.add_channel(agent_id, name, address, bot)
    except NotFound as exc:
        return error_response(404, str(exc), "not-found")
    except (BadQuery, StoreError) as exc:
        return error_response(400, str(exc), "invalid")
    return _json(channel_json(channel), 201)


async def set_agent_status(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    require_admin(request)
    agent_id = request.match_info["id"]
    try:
        data = await _body(request)
        try:
            status = AgentStatus(data.get("status"))
        except ValueError:
            raise BadQuery("status must be 'active' or 'off'") from None
        ctx.store.set_agent_status(agent_id, status)
    except NotFound as exc:
        return error_response(404, str(exc), "not-found")
    except BadQuery as exc:
        return error_response(400, str(exc), "invalid")
    return _json(agent_json(ctx.store.get_agent(agent_id)))


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/messages", list_messages)
    app.router.add_get("/admin/agents", list_agents)
    app.router.add_post("/admin/agents", create_agent)
    app.router.add_post("/admin/agents/{id}/channels", create_channel)
    app.router.add_put("/admin/agents/{id}/status", set_agent_status)
