"""Messages: search (newest first, keyset pages), the detail view (header fields, timing, reply
status), the body and reply only after an explicit POST (audited), and retry of a failed one."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from medagent.hub import hl7text
from medagent.hub.admin import BadQuery, parse_instant_ms
from medagent.hub.dashboard import actions
from medagent.hub.dashboard.layout import (
    csrf_input,
    not_found,
    page_response,
    result_box,
)
from medagent.hub.dashboard.markup import Markup, instant, join, render
from medagent.hub.dashboard.queries import PAGE, MessageFilter, MessageRow
from medagent.hub.dashboard.state import audit, state_of
from medagent.hub.records import AgentRecord, MessageStatus
from medagent.hub.store import NotFound

__all__ = ["message_body", "message_page", "message_retry", "messages_page"]

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
    agents = await state.ctx.store.list_agents()
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
    return page_response(request, "Messages", body, status=400 if error else 200)


def _message_id(request: web.Request) -> int | None:
    text = request.match_info["id"]
    return int(text) if text.isdigit() else None


async def _message_view(request: web.Request, *, show_body: bool = False,
                        result: actions.OperationResult | None = None) -> web.StreamResponse:
    state = state_of(request)
    message_id = _message_id(request)
    row = None if message_id is None else await state.reader.run(state.reader.message, message_id)
    if row is None:
        return not_found(request, "No such message.")
    texts = await state.reader.run(state.reader.message_texts, row.id)
    body_text, reply_text = texts if texts else ("", None)
    header = hl7text.scan_header(body_text) if row.content_type == "x-application/hl7-v2+er7" else None
    try:
        agent_name = (await state.ctx.store.get_agent(row.agent_id)).name
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
                        id=row.id, csrf=csrf_input(request))
    retry = Markup("")
    if row.status == MessageStatus.ERROR.value:
        retry = render('<form method="post" action="/dashboard/messages/{id}/retry" data-confirm="Run the bot again on message {id}?">'
                       '{csrf}<button type="submit" id="retry">Retry (run the bot again)</button></form>',
                       id=row.id, csrf=csrf_input(request))
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
        result=result_box(result) if result else Markup(""), status=_status_cell(row.status), error=row.error or "—",
        agent_id=row.agent_id, agent=agent_name, channel=row.channel, remote=row.remote, callback=row.callback,
        content_type=row.content_type, size=row.body_size, received=instant(row.received_at),
        processed=instant(row.processed_at), latency="—" if row.latency_ms is None else f"{row.latency_ms} ms",
        reply_status=row.reply_status if row.reply_status is not None else "—", reply_type=row.reply_content_type or "—",
        dup=row.duplicate, header=header_rows, retry=retry, bodies=bodies,
    )
    return page_response(request, f"Message {row.id}", body)


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
        return not_found(request, "No such message.")
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
