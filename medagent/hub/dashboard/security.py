"""Who may use the dashboard, and the HTTP hardening of every dashboard response.

Theory of operation
-------------------
* **Login** with the hub's admin token or an operator account (:mod:`.accounts`). Success opens
  a server-side session; the browser gets only a random 256-bit cookie value
  (``medagent_dashboard``) with ``HttpOnly`` (no script can read it), ``SameSite=Strict`` (no
  cross-site request carries it; RFC 6265bis §5.4.7), ``Path=/`` and ``Secure`` when the hub
  serves TLS.
* **CSRF**: every state-changing request (POST) must carry the session's CSRF token, in the
  form field ``csrf`` or the ``X-CSRF-Token`` header, compared in constant time (OWASP CSRF
  Prevention, synchronizer token pattern). Independently, a POST whose ``Origin`` header names
  another origin is refused — this also protects the login form, which has no session yet.
* **Rate limit**: :class:`LoginLimiter` allows ``MAX_FAILURES`` failed logins per client
  address and per user name within ``WINDOW_S``; further attempts get 429 with
  ``Retry-After`` without checking the password (so guessing cannot continue).
* **Headers** on every dashboard response (:data:`SECURITY_HEADERS`): a CSP that allows only
  this origin's scripts, styles and connections and no inline script (CSP Level 3),
  ``frame-ancestors 'none'`` plus ``X-Frame-Options: DENY`` (no framing, RFC 7034),
  ``nosniff``, referrers only within the site, and ``Cache-Control: no-store`` for pages (PHI must not be cached).

Invariants: no password, token or cookie value is logged; a request without a valid session
never reaches a page handler; every refused POST is answered (401/403/429) with a log line.
"""

from __future__ import annotations

import collections
import hmac
import logging
import time
from collections.abc import Callable

from aiohttp import web

from medagent.hub.dashboard.accounts import Session

__all__ = [
    "COOKIE",
    "CSRF_FIELD",
    "CSRF_HEADER",
    "SECURITY_HEADERS",
    "LoginLimiter",
    "clear_session_cookie",
    "client_address",
    "csrf_ok",
    "same_origin",
    "secure_headers",
    "set_session_cookie",
]

log = logging.getLogger(__name__)

COOKIE = "medagent_dashboard"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
MAX_FAILURES = 5
WINDOW_S = 60.0
_MAX_TRACKED = 10_000

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
        " font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: under no-referrer Chromium sends "Origin: null" on the
    # dashboard's own form posts, which the Origin check must refuse. URLs never leave the site.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def secure_headers(response: web.StreamResponse, *, cache: bool = False) -> web.StreamResponse:
    response.headers.update(SECURITY_HEADERS)
    if not cache:
        response.headers["Cache-Control"] = "no-store"
    return response


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


class LoginLimiter:
    """Failed logins per key (client address, user name) in a sliding window."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_failures
        self._window = window_s
        self._clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def retry_after(self, *keys: str) -> float:
        """Seconds until another attempt is allowed for all ``keys`` (0 = allowed now)."""
        now = self._clock()
        wait = 0.0
        for key in keys:
            times = self._failures.get(key)
            if times is None:
                continue
            while times and now - times[0] >= self._window:
                times.popleft()
            if len(times) >= self._max:
                wait = max(wait, self._window - (now - times[0]))
        return wait

    def failed(self, *keys: str) -> None:
        now = self._clock()
        for key in keys:
            times = self._failures.pop(key, None) or collections.deque(maxlen=self._max)
            times.append(now)
            self._failures[key] = times  # most recently failed last
        while len(self._failures) > _MAX_TRACKED:  # bounded memory under a spray of addresses
            self._failures.popitem(last=False)

    def succeeded(self, *keys: str) -> None:
        for key in keys:
            self._failures.pop(key, None)


def same_origin(request: web.Request) -> bool:
    """False when the request names another ``Origin`` (or ``null``: a sandboxed or privacy-stripped
    context); a request without ``Origin`` (older clients, scripts) relies on the CSRF token alone."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin == f"{request.scheme}://{request.host}"


def csrf_ok(session: Session, supplied: str | None) -> bool:
    return bool(supplied) and hmac.compare_digest(session.csrf.encode(), str(supplied).encode())


def set_session_cookie(response: web.StreamResponse, value: str, secure: bool) -> None:
    response.set_cookie(COOKIE, value, httponly=True, samesite="Strict", secure=secure, path="/")


def clear_session_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/")

