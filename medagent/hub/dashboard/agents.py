"""The agents overview (filterable, live) and one agent's page: channels, live figures and charts,
and the operations (fetch logs, reload, push a test message; upgrade shown disabled)."""

from __future__ import annotations

import time
from urllib.parse import urlencode

from aiohttp import web

from medagent.hub.dashboard import actions
from medagent.hub.dashboard.layout import (
    csrf_input,
    not_found,
    page_response,
    result_box,
)
from medagent.hub.dashboard.live import overview_snapshot
from medagent.hub.dashboard.markup import Markup, age, join, render
from medagent.hub.dashboard.state import audit, state_of
from medagent.hub.operations import presences_or_unknown
from medagent.hub.records import AgentRecord
from medagent.hub.store import NotFound

__all__ = ["LOG_LIMIT_MAX", "agent_action", "agent_page", "overview"]

LOG_LIMIT_MAX = 1000
TEST_MESSAGE = (
    "MSH|^~\\&|MEDAGENT|DASHBOARD|TEST|TEST|{stamp}||ADT^A01^ADT_A01|TEST{control}|T|2.5.1\r"
    "EVN|A01|{stamp}\r"
)



# -- agents -------------------------------------------------------------------------------

def _badge(online: bool) -> Markup:
    return render('<span class="badge {cls}">{text}</span>', cls="online" if online else "offline",
                  text="online" if online else "offline")


async def overview(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    name_filter = request.query.get("name", "").strip().lower()
    status_filter = request.query.get("status", "")
    snapshot = await overview_snapshot(state)
    agents: list[AgentRecord] = [
        a for a in await state.ctx.store.list_agents()
        if (not name_filter or name_filter in a.name.lower())
        and (status_filter not in ("online", "offline")
             or snapshot["agents"][a.id]["online"] == (status_filter == "online"))
    ]
    rows = []
    for a in agents:
        s = snapshot["agents"][a.id]
        rows.append(render(
            '<tr data-agent="{id}"><td><a href="/dashboard/agents/{id}">{name}</a></td><td>{status}</td>'
            '<td data-live="agents.{id}.online" data-format="online">{badge}</td>'
            '<td data-live="agents.{id}.version">{version}</td>'
            '<td data-live="agents.{id}.lastSeenS" data-format="age">{seen}</td>'
            '<td class="num" data-live="agents.{id}.minute">{minute}</td>'
            '<td class="num" data-live="agents.{id}.hour">{hour}</td>'
            '<td class="num"><a href="/dashboard/messages?agent={id}&amp;status=error" data-live="agents.{id}.failed">{failed}</a></td>'
            '<td class="num" data-live="agents.{id}.backlog">{backlog}</td></tr>',
            id=a.id, name=a.name, status=a.status.value, badge=_badge(s["online"]), version=s["version"] or "—",
            seen=age(s["lastSeenS"]), minute=_count(s["minute"]), hour=_count(s["hour"]), failed=s["failed"], backlog=s["backlog"],
        ))
    options = join(render('<option value="{v}"{sel}>{label}</option>', v=v, label=label,
                          sel=Markup(" selected") if v == status_filter else Markup(""))
                   for v, label in (("", "any status"), ("online", "online"), ("offline", "offline")))
    body = render(
        '<section class="cards">'
        '<div class="card"><span class="label">Agents online</span><span class="value"><span data-live="online">{online}</span>'
        ' / <span data-live="count">{count}</span></span></div>'
        '<div class="card"><span class="label">Messages stored</span><span class="value" data-live="total">{total}</span></div>'
        '<div class="card"><span class="label">Failed messages</span><span class="value" data-live="failed">{failed}</span></div>'
        '</section>'
        '<form method="get" class="filters"><label>Name <input name="name" value="{name}"></label>'
        '<label>Status <select name="status">{options}</select></label><button type="submit">Filter</button></form>'
        '<table class="agents"><thead><tr><th>Agent</th><th>Hub status</th><th>Connection</th><th>Version</th>'
        '<th>Last heard</th><th>Msgs (1 min)</th><th>Msgs (1 h)</th><th>Failed</th><th>Hub backlog</th></tr></thead>'
        '<tbody>{rows}</tbody></table>{empty}',
        online=snapshot["online"], count=snapshot["count"], total=snapshot["total"], failed=snapshot["failed"],
        name=request.query.get("name", ""), options=options, rows=join(rows),
        empty=Markup('<p class="hint">No agent matches.</p>') if not rows else Markup(""),
    )
    return page_response(request, "Agents", body, stream="/dashboard/events")


def _count(value: int | None) -> str:
    return "—" if value is None else str(value)  # None: the start-up count is still running


def _kind(address: str) -> str:
    return address.partition("://")[0]


async def _agent_body(request: web.Request, agent: AgentRecord, result: actions.OperationResult | None) -> Markup:
    state = state_of(request)
    ctx = state.ctx
    presence = (await presences_or_unknown(ctx, [agent.id]))[agent.id]
    seen = None if presence.last_updated is None else time.time() - presence.last_updated
    channels = await ctx.store.list_channels(agent.id)
    channel_rows = join(render(
        '<tr data-channel="{name}"><td>{name}</td><td>{kind}</td><td><code>{address}</code></td><td>{status}</td>'
        '<td class="num" data-live="stats.channels.{name}.connections">—</td>'
        '<td class="num" data-live="channels.{name}.lastMinute">—</td>'
        '<td class="num" data-live="channels.{name}.errors">—</td>'
        '<td data-live="stats.channels.{name}.answers" data-format="json">—</td>'
        '<td data-live="stats.channels.{name}.ackP50">—</td><td data-live="stats.channels.{name}.ackP99">—</td>'
        '<td class="num" data-live="channels.{name}.p50" data-format="ms">—</td>'
        '<td class="num" data-live="channels.{name}.p99" data-format="ms">—</td></tr>',
        name=c.name, kind=_kind(c.address), address=c.address, status=c.status.value,
    ) for c in channels)
    confirm_reload = f"Reload the configuration of agent {agent.name}?"
    confirm_push = f"Push this message through agent {agent.name}?"
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    return render(
        '{result}'
        '<p class="meta">id <code>{id}</code> · hub status {status} · client <code>{client}</code></p>'
        '<section class="cards">'
        '<div class="card"><span class="label">Connection</span><span class="value" data-live="agent.online" data-format="online">{badge}</span></div>'
        '<div class="card"><span class="label">Version</span><span class="value" data-live="agent.version">{version}</span></div>'
        '<div class="card"><span class="label">Last heard</span><span class="value" data-live="agent.lastSeenS" data-format="age">{seen}</span></div>'
        '<div class="card"><span class="label">Kernels</span><span class="value" data-live="stats.implementation">—</span></div>'
        '<div class="card"><span class="label">Link round-trip</span><span class="value" data-live="stats.rttMs" data-format="ms">—</span></div>'
        '<div class="card"><span class="label">Agent queue depth</span><span class="value" data-live="stats.queueDepth">—</span></div>'
        '<div class="card"><span class="label">Oldest unconfirmed</span><span class="value" data-live="stats.oldestUnconfirmedS" data-format="age">—</span></div>'
        '<div class="card"><span class="label">Msgs (1 h)</span><span class="value" data-live="agent.hour">—</span></div>'
        '<div class="card"><span class="label">Failed</span><span class="value"><a href="/dashboard/messages?agent={id}&amp;status=error" data-live="agent.failed">—</a></span></div>'
        '</section>'
        '<h2>Channels</h2>'
        '<table class="channels"><thead><tr><th>Channel</th><th>Kind</th><th>Endpoint</th><th>Hub status</th>'
        '<th>Connections</th><th>Msgs (1 min)</th><th>Errors (1 h)</th><th>Answers by code</th>'
        '<th>ACK p50</th><th>ACK p99</th><th>Bot reply p50</th><th>Bot reply p99</th></tr></thead>'
        '<tbody>{channels}</tbody></table>'
        '<div class="charts"><figure><figcaption>Messages per minute, last hour</figcaption>'
        '<canvas id="rate-chart" width="640" height="200" data-chart="rate"></canvas></figure>'
        '<figure><figcaption>ACK latency p50 / p99 at the agent (ms, worst channel, last hour)</figcaption>'
        '<canvas id="ack-chart" width="640" height="200" data-chart="ack"></canvas></figure></div>'
        '<h2>Operations</h2><div class="operations">'
        '<form method="post" action="/dashboard/agents/{id}/logs" data-confirm="Fetch the logs of agent {name}?">{csrf}'
        '<label>Lines <input name="limit" type="number" min="1" max="{log_max}" value="100"></label>'
        '<button type="submit" id="op-logs">Fetch logs</button></form>'
        '<form method="post" action="/dashboard/agents/{id}/reload" data-confirm="{confirm_reload}">{csrf}'
        '<button type="submit" id="op-reload">Reload configuration</button></form>'
        '<form method="post" action="/dashboard/agents/{id}/upgrade">{csrf}'
        '<button type="submit" id="op-upgrade" disabled title="agent upgrades are not available yet">Upgrade (not available yet)</button></form>'
        '<form method="post" action="/dashboard/agents/{id}/push" class="push" data-confirm="{confirm_push}">{csrf}'
        '<label>Destination <input name="destination" placeholder="mllp://host:port" required></label>'
        '<label>Content type <select name="contentType"><option>x-application/hl7-v2+er7</option>'
        '<option>x-application/ping</option><option>text/plain</option></select></label>'
        '<label>Body <textarea name="body" rows="4">{test}</textarea></label>'
        '<button type="submit" id="op-push">Push test message</button></form></div>',
        result=result_box(result) if result else Markup(""), id=agent.id, name=agent.name, status=agent.status.value,
        client=agent.client_id, badge=_badge(presence.connected), version=presence.version or "—", seen=age(seen),
        channels=channel_rows, csrf=csrf_input(request), log_max=LOG_LIMIT_MAX, confirm_reload=confirm_reload,
        confirm_push=confirm_push, test=TEST_MESSAGE.format(stamp=stamp, control=stamp).replace("\r", "\n"),
    )


async def _agent(request: web.Request) -> AgentRecord | None:
    try:
        return await state_of(request).ctx.store.get_agent(request.match_info["id"])
    except NotFound:
        return None


async def agent_page(request: web.Request) -> web.StreamResponse:
    agent = await _agent(request)
    if agent is None:
        return not_found(request, "No such agent.")
    return page_response(request, f"Agent {agent.name}", await _agent_body(request, agent, None),
                 stream=f"/dashboard/events?{urlencode({'agent': agent.id})}")


async def agent_action(request: web.Request) -> web.StreamResponse:
    """POST /dashboard/agents/{id}/{action}: logs | reload | push (upgrade: 409 until it exists)."""
    agent = await _agent(request)
    if agent is None:
        return not_found(request, "No such agent.")
    ctx = state_of(request).ctx
    action = request.match_info["action"]
    form = await request.post()
    if action == "reload":
        result = await actions.reload_config(ctx, agent.id)
    elif action == "logs":
        try:
            limit = max(1, min(LOG_LIMIT_MAX, int(str(form.get("limit") or "100"))))
        except ValueError:
            limit = 100
        result = await actions.fetch_logs(ctx, agent.id, limit)
    elif action == "push":
        params = {k: str(form.get(k, "")) for k in ("destination", "contentType", "body")}
        params["body"] = params["body"].replace("\r\n", "\r").replace("\n", "\r")  # HL7 segments end with CR
        result = await actions.push_message(ctx, agent.id, params)
    elif action == "upgrade":
        result = actions.OperationResult(False, "Upgrade is not available yet",
                                         "remote upgrades arrive with the remote-operations work")
    else:
        return not_found(request, "No such operation.")
    audit(request, action, f"Agent/{agent.id}", ("ok" if result.ok else "failed: ") + ("" if result.ok else result.detail))
    status = 200 if result.ok else (409 if action == "upgrade" else 502)
    return page_response(request, f"Agent {agent.name}", await _agent_body(request, agent, result), status=status,
                 stream=f"/dashboard/events?{urlencode({'agent': agent.id})}")
