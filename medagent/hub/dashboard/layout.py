"""The frame every dashboard page shares: head (CSP-clean: scripts and styles are files), navigation
with the user and a logout form carrying the CSRF token, the result box of an action, 404s.

Every value goes through :func:`medagent.hub.dashboard.markup.render` (escaped by default).
"""

from __future__ import annotations

from aiohttp import web

from medagent import __version__
from medagent.hub.dashboard import actions
from medagent.hub.dashboard.markup import Markup, render
from medagent.hub.dashboard.security import (
    CSRF_FIELD,
)
from medagent.hub.dashboard.state import session_of

__all__ = ["STATIC", "csrf_input", "has_session", "not_found", "page_response", "result_box"]

STATIC = "/static/dashboard"


# -- layout -------------------------------------------------------------------------------

def page_response(request: web.Request | None, title: str, body: Markup, *, status: int = 200, stream: str = "") -> web.Response:
    session = session_of(request) if request is not None and has_session(request) else None
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


def has_session(request: web.Request) -> bool:
    try:
        session_of(request)
    except KeyError:
        return False
    return True


def csrf_input(request: web.Request) -> Markup:
    return render('<input type="hidden" name="{name}" value="{value}">', name=CSRF_FIELD, value=session_of(request).csrf)


def result_box(result: actions.OperationResult) -> Markup:
    detail = render("<pre>{text}</pre>", text=result.detail) if result.detail else Markup("")
    return render('<section class="result {kind}" id="result" role="status"><h2>{title}</h2>{detail}</section>',
                  kind="ok" if result.ok else "failed", title=result.title, detail=detail)


def not_found(request: web.Request, what: str) -> web.Response:
    return page_response(request, "Not found", render('<p class="error">{what}</p>', what=what), status=404)
