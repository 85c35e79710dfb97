"""The hub's operator dashboard, served by the hub at ``/`` (redirect) and ``/dashboard/…``.

Theory of operation
-------------------
Server-rendered HTML pages (:mod:`.login`, :mod:`.agents`, :mod:`.messages`, :mod:`.inventory`
in the frame of :mod:`.layout`, escaped by default: :mod:`.markup`) with one small
hand-written script and stylesheet shipped in ``static/`` (no CDN, no build step, no template
or front-end dependency): the script adds confirmation dialogs, live figures from a
server-sent event stream (:mod:`.live`) and two canvas charts. Everything an operator does goes
through the hub's own objects (store, registry, dispatcher, :mod:`medagent.hub.operations`);
the dashboard keeps only its accounts, sessions and audit log, in its own database
(:mod:`.accounts`). Reads of the hub's database run on a reader thread with indexes of their own
(:mod:`.queries`). Security (:mod:`.security`, :mod:`.state`): session cookie HttpOnly +
SameSite=Strict, CSRF token on every POST, CSP without inline script, no framing, rate-limited
logins, audit of every action.

Routes: ``GET /`` -> ``/dashboard/``; ``GET|POST /dashboard/login``; ``POST /dashboard/logout``;
``GET /dashboard/`` (agents); ``GET /dashboard/agents/{id}``; ``POST /dashboard/agents/{id}/
{logs|reload|push|upgrade}``; ``GET /dashboard/messages``; ``GET /dashboard/messages/{id}``;
``POST /dashboard/messages/{id}/body``; ``POST /dashboard/messages/{id}/retry``;
``GET /dashboard/dicom`` (stored series with their DICOMweb URLs); ``GET /dashboard/audit``;
``GET /dashboard/events`` (SSE); ``GET /static/dashboard/…``.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["STATIC_DIR", "add_dashboard_routes"]

STATIC_DIR = Path(__file__).resolve().parent / "static"


def add_dashboard_routes(app: web.Application) -> None:
    """Mount the dashboard on the hub's application (before it starts)."""
    from medagent.hub.dashboard import agents, inventory, live, login, messages
    from medagent.hub.dashboard.state import dashboard_lifecycle, dashboard_shutdown, guarded

    app.cleanup_ctx.append(dashboard_lifecycle)
    app.on_shutdown.append(dashboard_shutdown)
    router = app.router
    router.add_get("/", login.root)
    router.add_get("/dashboard", login.root)
    router.add_get("/dashboard/login", login.login_form)
    router.add_post("/dashboard/login", login.login)
    router.add_post("/dashboard/logout", guarded(login.logout))
    router.add_get("/dashboard/", guarded(agents.overview))
    router.add_get("/dashboard/agents/{id}", guarded(agents.agent_page))
    router.add_post("/dashboard/agents/{id}/{action}", guarded(agents.agent_action))
    router.add_get("/dashboard/messages", guarded(messages.messages_page))
    router.add_get("/dashboard/messages/{id}", guarded(messages.message_page))
    router.add_post("/dashboard/messages/{id}/body", guarded(messages.message_body))
    router.add_post("/dashboard/messages/{id}/retry", guarded(messages.message_retry))
    router.add_get("/dashboard/dicom", guarded(inventory.dicom_page))
    router.add_get("/dashboard/audit", guarded(inventory.audit_page))
    router.add_get("/dashboard/events", guarded(live.events, page=False))
    router.add_static("/static/dashboard", STATIC_DIR, append_version=False, show_index=False)
