"""The dashboard's pages: server-rendered HTML, one handler per page or action.

Every handler here runs behind :func:`medagent.hub.dashboard.state.guarded` (session, CSRF,
security headers) except the login form. Pages are complete without JavaScript; the static
script only adds confirmation dialogs and the live figures (:mod:`.live`). Message bodies and
bot replies (PHI) appear only after an explicit POST ("Show body"), which is audited. Every
operator action is audited with its outcome, and answered with a page showing the result.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from medagent import __version__
from medagent.hub import hl7text
from medagent.hub.admin import BadQuery, parse_instant_ms
from medagent.hub.dashboard import actions
from medagent.hub.dashboard.accounts import ADMIN_USER, constant_time_equal
from medagent.hub.dashboard.live import overview_snapshot
from medagent.hub.dashboard.markup import Markup, age, instant, join, render
from medagent.hub.dashboard.queries import PAGE, MessageFilter, MessageRow
from medagent.hub.dashboard.security import (
    COOKIE,
    CSRF_FIELD,
    clear_session_cookie,
    client_address,
    same_origin,
    secure_headers,
    set_session_cookie,
)
from medagent.hub.dashboard.state import audit, redirect, session_of, state_of
from medagent.hub.records import AgentRecord, MessageStatus
from medagent.hub.store import NotFound

__all__ = [
    "agent_action",
    "agent_page",
    "audit_page",
    "dicom_page",
    "login",
    "login_form",
    "logout",
    "message_body",
    "message_page",
    "message_retry",
    "messages_page",
    "overview",
    "root",
]

STATIC = "/static/dashboard"
LOG_LIMIT_MAX = 1000
TEST_MESSAGE = (
    "MSH|^~\\&|MEDAGENT|DASHBOARD|TEST|TEST|{stamp}||ADT^A01^ADT_A01|TEST{control}|T|2.5.1\r"
    "EVN|A01|{stamp}\r"
)


# -- layout -------------------------------------------------------------------------------

def _page(request: web.Request | None, title: str, body: Markup, *, status: int = 200, stream: str = "") -> web.Response:
    session = session_of(request) if request is not None and _has_session(request) else None
    if session is not None:
        nav = render(
            '<nav><a href="/dashboard/">Agents</a><a href="/dashboard/messages">Messages</a>'
            '<a href="/dashboard/dicom">DICOM</a><a href="/dashboard/audit">Audit log</a></nav>'
            '<span class="who">{user}</span>'
            '<form method="post" action="/dashboard/logout" class="inline">'
            '<input type="hidden" name="csrf" value="{csrf}"><button type="submit">Log out</button></form>',
            user=session.user, csrf=session.csrf,
        )
        csrf_meta = render('<meta name="csrf-token" content="{csrf}">', csrf=session.csrf)
    else:
        nav, csrf_meta = Markup(""), Markup("")
    document = render(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">{csrf_meta}'
        '<title>{title} · medagent hub</title><link rel="stylesheet" href="{static}/dashboard.css">'
        '<script src="{static}/dashboard.js" defer></script></head>'
        '<body><header><a class="brand" href="/dashboard/">medagent hub</a>{nav}</header>'
        '<main data-stream="{stream}"><h1>{title}</h1>{body}</main>'
        '<footer>medagent {version}</footer></body></html>',
        csrf_meta=csrf_meta, title=title, static=STATIC, nav=nav, stream=stream, body=body, version=__version__,
    )
    return web.Response(text=document, status=status, content_type="text/html", charset="utf-8")


def _has_session(request: web.Request) -> bool:
    try:
        session_of(request)
    except KeyError:
        return False
    return True


def _csrf_input(request: web.Request) -> Markup:
    return render('<input type="hidden" name="{name}" value="{value}">', name=CSRF_FIELD, value=session_of(request).csrf)


def _result_box(result: actions.OperationResult) -> Markup:
    detail = render("<pre>{text}</pre>", text=result.detail) if result.detail else Markup("")
    return render('<section class="result {kind}" id="result" role="status"><h2>{title}</h2>{detail}</section>',
                  kind="ok" if result.ok else "failed", title=result.title, detail=detail)


def _not_found(request: web.Request, what: str) -> web.Response:
    return _page(request, "Not found", render('<p class="error">{what}</p>', what=what), status=404)


# -- login --------------------------------------------------------------------------------

def _safe_next(value: str | None) -> str:
    """Only a path inside the dashboard (no open redirect to another site)."""
    if value and value.startswith("/dashboard") and not value.startswith("//") and "\\" not in value:
        return value
    return "/dashboard/"


def _login_page(next_path: str, error: str = "", status: int = 200) -> web.Response:
    message = render('<p class="error" role="alert">{error}</p>', error=error) if error else Markup("")
    body = render(
        '{message}<form method="post" action="/dashboard/login" class="login">'
        '<input type="hidden" name="next" value="{next}">'
        '<label>Operator name <input name="user" autocomplete="username" placeholder="empty: admin token"></label>'
        '<label>Password or admin token <input name="password" type="password" autocomplete="current-password" required>'
        '</label><button type="submit">Log in</button></form>'
        '<p class="hint">Operators are created with <code>medagent hub add-user NAME</code>; the admin token is in'
        ' the hub data directory (<code>admin-token</code>).</p>',
        message=message, next=next_path,
    )
    response = _page(None, "Log in", body, status=status)
    secure_headers(response)
    return response


async def root(request: web.Request) -> web.StreamResponse:
    return secure_headers(redirect("/dashboard/"))


async def login_form(request: web.Request) -> web.StreamResponse:
    return _login_page(_safe_next(request.query.get("next")))


async def login(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    remote = client_address(request)
    if not same_origin(request):
        return secure_headers(web.Response(status=403, text="Cross-origin login refused\n"))
    form = await request.post()
    user, secret = str(form.get("user", "")).strip(), str(form.get("password", ""))
    next_path = _safe_next(str(form.get("next", "")))
    keys = (f"addr:{remote}", f"user:{user or ADMIN_USER}")
    wait = state.limiter.retry_after(*keys)
    if wait > 0:
        state.db.audit(user or ADMIN_USER, remote, "login", "dashboard", "refused: rate limited")
        response = _login_page(next_path, f"Too many failed logins; try again in {int(wait) + 1} s.", 429)
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    if not user:
        ok, user = bool(secret) and constant_time_equal(secret, state.ctx.admin_token), ADMIN_USER
    else:
        ok = await asyncio.to_thread(state.db.check_password, user, secret)
    if not ok:
        state.limiter.failed(*keys)
        state.db.audit(user, remote, "login", "dashboard", "failed")
        return _login_page(next_path, "Wrong name, password or token.", 401)
    state.limiter.succeeded(*keys)
    cookie, _ = state.db.open_session(user)
    state.db.audit(user, remote, "login", "dashboard", "ok")
    response = redirect(next_path)
    set_session_cookie(response, cookie, state.secure_cookies)
    return secure_headers(response)


async def logout(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    cookie = request.cookies.get(COOKIE, "")
    audit(request, "logout", "dashboard", "ok")
    state.db.close_session(cookie)
    response = redirect("/dashboard/login")
    clear_session_cookie(response)
    return response


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
        a for a in state.ctx.store.list_agents()
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
    return _page(request, "Agents", body, stream="/dashboard/events")


def _count(value: int | None) -> str:
    return "—" if value is None else str(value)  # None: the start-up count is still running


def _kind(address: str) -> str:
    return address.partition("://")[0]


def _agent_body(request: web.Request, agent: AgentRecord, result: actions.OperationResult | None) -> Markup:
    state = state_of(request)
    ctx = state.ctx
    presence = ctx.registry.presence(agent.id)
    seen = None if presence.last_updated is None else time.time() - presence.last_updated
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
    ) for c in ctx.store.list_channels(agent.id))
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
        result=_result_box(result) if result else Markup(""), id=agent.id, name=agent.name, status=agent.status.value,
        client=agent.client_id, badge=_badge(presence.connected), version=presence.version or "—", seen=age(seen),
        channels=channel_rows, csrf=_csrf_input(request), log_max=LOG_LIMIT_MAX, confirm_reload=confirm_reload,
        confirm_push=confirm_push, test=TEST_MESSAGE.format(stamp=stamp, control=stamp).replace("\r", "\n"),
    )


def _agent(request: web.Request) -> AgentRecord | None:
    try:
        return state_of(request).ctx.store.get_agent(request.match_info["id"])
    except NotFound:
        return None


async def agent_page(request: web.Request) -> web.StreamResponse:
    agent = _agent(request)
    if agent is None:
        return _not_found(request, "No such agent.")
    return _page(request, f"Agent {agent.name}", _agent_body(request, agent, None),
                 stream=f"/dashboard/events?{urlencode({'agent': agent.id})}")


async def agent_action(request: web.Request) -> web.StreamResponse:
    """POST /dashboard/agents/{id}/{action}: logs | reload | push (upgrade: 409 until it exists)."""
    agent = _agent(request)
    if agent is None:
        return _not_found(request, "No such agent.")
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
        return _not_found(request, "No such operation.")
    audit(request, action, f"Agent/{agent.id}", ("ok" if result.ok else "failed: ") + ("" if result.ok else result.detail))
    status = 200 if result.ok else (409 if action == "upgrade" else 502)
    return _page(request, f"Agent {agent.name}", _agent_body(request, agent, result), status=status,
                 stream=f"/dashboard/events?{urlencode({'agent': agent.id})}")


# -- messages -----------------------------------------------------------------------------

def _message_filter(query: Any, agents: list[AgentRecord]) -> MessageFilter:
    status = query.get("status") or None
    if status is not None and status not in {s.value for s in MessageStatus}:
        raise BadQuery(f"status must be one of {', '.join(s.value for s in MessageStatus)}")
    agent = query.get("agent") or None
    if agent is not None:  # id or name
        agent = next((a.id for a in agents if agent in (a.id, a.name)), agent)
    before = query.get("before") or None
    if before is not None and not before.isdigit():
        raise BadQuery("before must be a message id")
    return MessageFilter(
        agent_id=agent, channel=query.get("channel") or None, message_type=query.get("type") or None,
        control_id=query.get("control_id") or None, status=status,
        since_ms=parse_instant_ms(query["since"], "since") if query.get("since") else None,
        until_ms=parse_instant_ms(query["until"], "until") if query.get("until") else None,
        before_id=int(before) if before else None,
    )


def _status_cell(status: str) -> Markup:
    return render('<span class="status {s}">{s}</span>', s=status)


async def messages_page(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    agents = state.ctx.store.list_agents()
    names = {a.id: a.name for a in agents}
    error = Markup("")
    rows: list[MessageRow] = []
    next_before = None
    try:
        filters = _message_filter(request.query, agents)
        rows, next_before = await state.reader.run(state.reader.search, filters, PAGE)
    except BadQuery as exc:
        error = render('<p class="error" role="alert">{text}</p>', text=str(exc))
    q = request.query
    agent_options = join([Markup('<option value="">any agent</option>')] + [
        render('<option value="{id}"{sel}>{name}</option>', id=a.id, name=a.name,
               sel=Markup(" selected") if q.get("agent") in (a.id, a.name) else Markup(""))
        for a in agents])
    status_options = join(render('<option value="{v}"{sel}>{label}</option>', v=v, label=v or "any status",
                                 sel=Markup(" selected") if q.get("status", "") == v else Markup(""))
                          for v in ("", *(s.value for s in MessageStatus)))
    table_rows = join(render(
        '<tr><td><a href="/dashboard/messages/{id}">{id}</a></td><td>{received}</td><td>{agent}</td>'
        '<td>{channel}</td><td>{type}</td><td>{control}</td><td>{status}</td><td class="num">{latency}</td>'
        '<td class="num">{dup}</td></tr>',
        id=m.id, received=instant(m.received_at), agent=names.get(m.agent_id, m.agent_id), channel=m.channel,
        type=m.message_type or m.content_type, control=m.control_id or "—", status=_status_cell(m.status),
        latency="—" if m.latency_ms is None else f"{m.latency_ms} ms", dup=m.duplicate or "",
    ) for m in rows)
    more = Markup("")
    if next_before is not None:
        params = {k: v for k, v in q.items() if k != "before" and v}
        params["before"] = str(next_before)
        more = render('<p><a class="more" href="/dashboard/messages?{qs}">Older messages →</a></p>', qs=urlencode(params))
    body = render(
        '{error}<form method="get" class="filters">'
        '<label>Agent <select name="agent">{agents}</select></label>'
        '<label>Channel <input name="channel" value="{channel}"></label>'
        '<label>Type <input name="type" value="{type}" placeholder="ADT or ADT^A01"></label>'
        '<label>Control id <input name="control_id" value="{control}"></label>'
        '<label>Status <select name="status">{statuses}</select></label>'
        '<label>Since <input name="since" value="{since}" placeholder="2026-11-30T08:00Z"></label>'
        '<label>Until <input name="until" value="{until}"></label>'
        '<button type="submit">Search</button></form>'
        '<table class="messages"><thead><tr><th>#</th><th>Received</th><th>Agent</th><th>Channel</th><th>Type</th>'
        '<th>Control id</th><th>Status</th><th>Bot reply</th><th>Resends</th></tr></thead><tbody>{rows}</tbody></table>'
        '{empty}{more}',
        error=error, agents=agent_options, channel=q.get("channel", ""), type=q.get("type", ""),
        control=q.get("control_id", ""), statuses=status_options, since=q.get("since", ""), until=q.get("until", ""),
        rows=table_rows, more=more,
        empty=Markup('<p class="hint">No message matches.</p>') if not rows else Markup(""),
    )
    return _page(request, "Messages", body, status=400 if error else 200)


def _message_id(request: web.Request) -> int | None:
    text = request.match_info["id"]
    return int(text) if text.isdigit() else None


async def _message_view(request: web.Request, *, show_body: bool = False,
                        result: actions.OperationResult | None = None) -> web.StreamResponse:
    state = state_of(request)
    message_id = _message_id(request)
    row = None if message_id is None else await state.reader.run(state.reader.message, message_id)
    if row is None:
        return _not_found(request, "No such message.")
    texts = await state.reader.run(state.reader.message_texts, row.id)
    body_text, reply_text = texts if texts else ("", None)
    header = hl7text.scan_header(body_text) if row.content_type == "x-application/hl7-v2+er7" else None
    try:
        agent_name = state.ctx.store.get_agent(row.agent_id).name
    except NotFound:
        agent_name = row.agent_id
    header_rows = Markup("")
    if header is not None:
        header_rows = join(render("<tr><th>{k}</th><td>{v}</td></tr>", k=k, v=v or "—") for k, v in (
            ("Sending application (MSH-3)", header.sending_application), ("Sending facility (MSH-4)", header.sending_facility),
            ("Receiving application (MSH-5)", header.receiving_application),
            ("Receiving facility (MSH-6)", header.receiving_facility), ("Message time (MSH-7)", header.timestamp),
            ("Message type (MSH-9)", header.message_type), ("Control id (MSH-10)", header.control_id),
            ("Processing id (MSH-11)", header.processing_id), ("Version (MSH-12)", header.version),
            ("Accept ACK (MSH-15)", header.accept_ack_type), ("Application ACK (MSH-16)", header.app_ack_type),
            ("Charset (MSH-18)", header.charset),
        ))
    if show_body:
        bodies = render('<h2>Body</h2><pre class="phi" id="message-body">{body}</pre><h2>Bot reply</h2>'
                        '<pre class="phi" id="reply-body">{reply}</pre>',
                        body=body_text, reply=reply_text if reply_text is not None else "(no reply recorded)")
    else:
        bodies = render('<form method="post" action="/dashboard/messages/{id}/body">{csrf}'
                        '<button type="submit" id="show-body">Show body and reply (PHI; the access is audited)</button></form>',
                        id=row.id, csrf=_csrf_input(request))
    retry = Markup("")
    if row.status == MessageStatus.ERROR.value:
        retry = render('<form method="post" action="/dashboard/messages/{id}/retry" data-confirm="Run the bot again on message {id}?">'
                       '{csrf}<button type="submit" id="retry">Retry (run the bot again)</button></form>',
                       id=row.id, csrf=_csrf_input(request))
    body = render(
        '{result}<table class="detail">'
        '<tr><th>Status</th><td id="message-status">{status}</td></tr>'
        '<tr><th>Error</th><td>{error}</td></tr>'
        '<tr><th>Agent</th><td><a href="/dashboard/agents/{agent_id}">{agent}</a></td></tr>'
        '<tr><th>Channel</th><td>{channel}</td></tr><tr><th>Remote</th><td>{remote}</td></tr>'
        '<tr><th>Callback</th><td><code>{callback}</code></td></tr>'
        '<tr><th>Content type</th><td>{content_type}</td></tr><tr><th>Size</th><td>{size} bytes</td></tr>'
        '<tr><th>Received</th><td>{received}</td></tr><tr><th>Processed</th><td>{processed}</td></tr>'
        '<tr><th>Received → processed</th><td>{latency}</td></tr>'
        '<tr><th>Reply</th><td>status {reply_status}, {reply_type}</td></tr>'
        '<tr><th>Resends seen</th><td>{dup}</td></tr>{header}</table>{retry}{bodies}',
        result=_result_box(result) if result else Markup(""), status=_status_cell(row.status), error=row.error or "—",
        agent_id=row.agent_id, agent=agent_name, channel=row.channel, remote=row.remote, callback=row.callback,
        content_type=row.content_type, size=row.body_size, received=instant(row.received_at),
        processed=instant(row.processed_at), latency="—" if row.latency_ms is None else f"{row.latency_ms} ms",
        reply_status=row.reply_status if row.reply_status is not None else "—", reply_type=row.reply_content_type or "—",
        dup=row.duplicate, header=header_rows, retry=retry, bodies=bodies,
    )
    return _page(request, f"Message {row.id}", body)


async def message_page(request: web.Request) -> web.StreamResponse:
    return await _message_view(request)


async def message_body(request: web.Request) -> web.StreamResponse:
    """POST: the detail page with the body and reply shown; audited (PHI access)."""
    message_id = _message_id(request)
    audit(request, "view-body", f"message {message_id}", "ok")
    return await _message_view(request, show_body=True)


async def message_retry(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    message_id = _message_id(request)
    row = None if message_id is None else await state.reader.run(state.reader.message, message_id)
    if row is None:
        return _not_found(request, "No such message.")
    try:
        after = await actions.retry_message(state.ctx, state.reader, row)
    except actions.RetryError as exc:
        audit(request, "retry", f"message {row.id}", f"refused: {exc}")
        return await _message_view(request, result=actions.OperationResult(False, "Retry refused", str(exc)))
    if after.processed_at == row.processed_at:
        result = actions.OperationResult(False, "Retry submitted", "the bot has not finished yet; reload to see")
    else:
        result = actions.OperationResult(after.status != MessageStatus.ERROR.value, f"Retry done: {after.status}",
                                         after.error or "")
    audit(request, "retry", f"message {row.id}", after.status)
    return await _message_view(request, result=result)


# -- DICOM ------------------------------------------------------------------------------

async def dicom_page(request: web.Request) -> web.StreamResponse:
    """Stored DICOM series, newest first, each with its DICOMweb (WADO-RS) URL."""
    state = state_of(request)
    series = await state.reader.run(state.reader.dicom_series)
    if series is None:
        return _page(request, "DICOM", Markup('<p class="hint">This hub has no DICOM store.</p>'))
    base = f"{request.scheme}://{request.host}/dicomweb"
    rows = join(render(
        '<tr><td><code>{study}</code></td><td><code>{series}</code></td><td>{modality}</td><td>{date}</td>'
        '<td class="num">{count}</td><td class="num">{size}</td><td>{stored}</td>'
        '<td><a href="{url}">{url}</a></td></tr>',
        study=s.study_uid, series=s.series_uid, modality=s.modality or "—", date=s.study_date or "—",
        count=s.instances, size=f"{s.size / 2**20:.1f} MiB", stored=instant(s.last_stored * 1000),
        url=f"{base}/studies/{s.study_uid}/series/{s.series_uid}",
    ) for s in series)
    body = render(
        '<p class="hint">DICOMweb URLs answer QIDO-RS / WADO-RS clients that send the admin token or an agent'
        ' token as a bearer token.</p>'
        '<table class="dicom"><thead><tr><th>Study UID</th><th>Series UID</th><th>Modality</th><th>Study date</th>'
        '<th>Instances</th><th>Size</th><th>Last stored</th><th>DICOMweb (WADO-RS)</th></tr></thead>'
        '<tbody>{rows}</tbody></table>{empty}',
        rows=rows, empty=Markup('<p class="hint">No DICOM instance stored yet.</p>') if not series else Markup(""),
    )
    return _page(request, "DICOM", body)


# -- audit --------------------------------------------------------------------------------

async def audit_page(request: web.Request) -> web.StreamResponse:
    entries = state_of(request).db.audit_entries(200)
    rows = join(render('<tr><td>{at}</td><td>{user}</td><td>{remote}</td><td>{action}</td><td>{target}</td>'
                       '<td>{outcome}</td></tr>', at=instant(e.at * 1000), user=e.user, remote=e.remote,
                       action=e.action, target=e.target, outcome=e.outcome) for e in entries)
    body = render('<table class="audit"><thead><tr><th>Time</th><th>User</th><th>From</th><th>Action</th>'
                  '<th>Target</th><th>Outcome</th></tr></thead><tbody>{rows}</tbody></table>', rows=rows)
    return _page(request, "Audit log", body)
