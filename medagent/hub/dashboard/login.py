"""Logging in and out: the login form, its POST (admin token or operator account, rate-limited,
Origin-checked, audited) and logout (ends the server-side session, clears the cookie)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from medagent.hub.dashboard.accounts import ADMIN_USER, constant_time_equal
from medagent.hub.dashboard.layout import (
    page_response,
)
from medagent.hub.dashboard.markup import Markup, render
from medagent.hub.dashboard.security import (
    COOKIE,
    clear_session_cookie,
    client_address,
    same_origin,
    secure_headers,
    set_session_cookie,
)
from medagent.hub.dashboard.state import audit, redirect, state_of

__all__ = ["login", "login_form", "logout", "root"]

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
    response = page_response(None, "Log in", body, status=status)
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
