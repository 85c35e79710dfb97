"""The dashboard's per-application state and the guard every dashboard handler runs behind.

:class:`DashboardState` (under :data:`STATE_KEY`) is created when the hub application starts
(``cleanup_ctx``: the reader thread and the dashboard database open, the indexes are ensured)
and closed when it stops. :func:`guarded` wraps a handler: it resolves the session from the
cookie, refuses a request without one (pages: 303 to the login form; POST, event streams: 401),
checks ``Origin`` and the CSRF token on every POST, and adds the security headers to whatever
the handler returns — including refusals and errors.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from medagent.hub.context import CTX_KEY, HubContext
from medagent.hub.dashboard import security
from medagent.hub.dashboard.accounts import DashboardDB, Session
from medagent.hub.dashboard.queries import HubReader
from medagent.hub.dashboard.security import (
    LoginLimiter,
    client_address,
    csrf_ok,
    same_origin,
    secure_headers,
)
from medagent.hub.dicomweb.store import DB_FILE as DICOM_DB_FILE

__all__ = ["STATE_KEY", "DashboardState", "audit", "dashboard_lifecycle", "dashboard_shutdown", "guarded", "redirect", "session_of", "state_of"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DashboardState:
    ctx: HubContext
    db: DashboardDB
    reader: HubReader
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    #: set when the hub shuts down, so open event streams end at once
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    #: per agent: (epoch ms, ACK p50 ms, ACK p99 ms) samples of the last hour (see live.ack_point)
    ack_history: dict[str, collections.deque[tuple[int, float | None, float | None]]] = field(default_factory=dict)
    #: per agent: the channel histograms of the previous $stats sample
    ack_previous: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    @property
    def secure_cookies(self) -> bool:
        return self.ctx.settings.tls_cert is not None


STATE_KEY: web.AppKey[DashboardState] = web.AppKey("medagent_dashboard_state", DashboardState)
_SESSION_KEY: web.RequestKey[Session] = web.RequestKey("medagent_dashboard_session", Session)


async def dashboard_lifecycle(app: web.Application) -> AsyncIterator[None]:
    ctx = app[CTX_KEY]
    store = ctx.store.path if ctx.store.path is not None else ctx.settings.store  # the URL with its password
    assert store is not None
    reader = HubReader(store, Path(ctx.settings.data_dir) / DICOM_DB_FILE)
    await reader.start()
    db = DashboardDB(ctx.settings.data_dir)
    app[STATE_KEY] = DashboardState(ctx, db, reader)
    try:
        yield
    finally:
        app[STATE_KEY].closing.set()
        await reader.close()
        db.close()


async def dashboard_shutdown(app: web.Application) -> None:
    """``on_shutdown``: end the event streams before the server waits for its handlers."""
    if STATE_KEY in app:
        app[STATE_KEY].closing.set()


def state_of(request: web.Request) -> DashboardState:
    return request.app[STATE_KEY]


def session_of(request: web.Request) -> Session:
    return request[_SESSION_KEY]


def audit(request: web.Request, action: str, target: str, outcome: str) -> None:
    state_of(request).db.audit(session_of(request).user, client_address(request), action, target, outcome)


def redirect(location: str) -> web.Response:
    """303 See Other (after a POST the browser follows with a GET)."""
    return web.Response(status=303, headers={"Location": location})


def _refused(request: web.Request, status: int, text: str) -> web.Response:
    log.info("dashboard refused %s %s from %s: %s", request.method, request.path, client_address(request), text)
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


def guarded(handler: Callable[[web.Request], Awaitable[web.StreamResponse]], *, page: bool = True
            ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """``handler`` behind the session check, the CSRF check (POST) and the security headers."""

    async def wrapper(request: web.Request) -> web.StreamResponse:
        state = state_of(request)
        cookie = request.cookies.get(security.COOKIE)
        session = state.db.session(cookie) if cookie else None
        if session is None:
            if request.method == "GET" and page:
                target = quote(request.path_qs, safe="/?=&")
                return secure_headers(redirect(f"/dashboard/login?next={target}"))
            return secure_headers(_refused(request, 401, "Log in to the dashboard first"))
        if request.method == "POST":
            if not same_origin(request):
                return secure_headers(_refused(request, 403, "Cross-origin request refused"))
            supplied = request.headers.get(security.CSRF_HEADER)
            if supplied is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
                supplied = (await request.post()).get(security.CSRF_FIELD)  # type: ignore[assignment]
            if not csrf_ok(session, supplied):
                state.db.audit(session.user, client_address(request), "csrf-refused", request.path, "403")
                return secure_headers(_refused(request, 403, "Missing or wrong CSRF token; reload the page and try again"))
        request[_SESSION_KEY] = session
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # a plain response: returning the exception is deprecated
            response = web.Response(status=exc.status, reason=exc.reason, text=exc.text, headers=exc.headers)
        return response if response.prepared else secure_headers(response)

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper
