"""OAuth2 client-credentials token client for the hub (Medplum-compatible).

Theory of operation
-------------------
The agent authenticates like the Medplum agent (medplum-protocol.md §1.1): an OAuth2
*client_credentials* grant (RFC 6749 §4.4) — ``POST <base>/oauth2/token`` with the form
``grant_type=client_credentials&client_id=..&client_secret=..`` — whose JSON reply carries
``access_token`` and ``expires_in`` (RFC 6749 §5.1). :class:`TokenClient` caches the token and
fetches a new one once it is within ``refresh_margin_s`` of expiry (the margin shrinks to half
the lifetime for short-lived tokens, so a 30 s token is not re-fetched on every call).
Concurrent callers share one in-flight fetch.

Failures are split by what the operator must do about them:

* :class:`AuthError` — the hub *answered* and refused: HTTP 400/401/403 (bad client id or
  secret, disabled client) or 404 (no token endpoint: wrong base URL). Retrying immediately
  cannot help; the caller backs off and the message tells the user what to fix.
* :class:`HubUnavailableError` — transient: connection refused, DNS, timeout, TLS failure,
  HTTP 5xx/429, or a reply that is not the expected JSON. Retry with backoff.

:meth:`TokenClient.fetch_json` is an authenticated ``GET`` for the runtime's REST reads
(``/fhir/R4/Agent/<id>``, ``/fhir/R4/Endpoint/<id>``); on 401 it fetches a new token once and
retries. The client never logs the secret or the token; it logs only URLs and status codes.

Invariants: ``get_token()`` returns a token whose expiry is more than the effective margin away,
or raises; an HTTP session is created lazily inside the running loop and closed by ``close()``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
import time
from typing import Any
from urllib.parse import urljoin

import aiohttp
import orjson

__all__ = [
    "AuthError",
    "HubUnavailableError",
    "HubRequestError",
    "TokenClient",
    "build_ssl_context",
]

log = logging.getLogger(__name__)

TOKEN_PATH = "/oauth2/token"
DEFAULT_EXPIRES_IN_S = 3600.0
#: HTTP statuses that mean "the hub refused these credentials / this URL": retrying cannot help.
_PERMANENT_STATUSES = frozenset({400, 401, 403, 404})


class AuthError(Exception):
    """The hub refused the client credentials (or has no token endpoint at the base URL)."""


class HubUnavailableError(ConnectionError):
    """The hub could not be reached or gave a transient failure; retry later."""


class HubRequestError(Exception):
    """An authenticated REST request got a non-success status."""

    def __init__(self, status: int, url: str, detail: str) -> None:
        super().__init__(f"GET {url} failed with HTTP {status}: {detail}")
        self.status = status
        self.url = url


def build_ssl_context(ca_file: str | None = None, verify: bool = True) -> ssl_module.SSLContext:
    """A client TLS context: system CAs (plus ``ca_file`` for a private CA), or no verification."""
    context = ssl_module.create_default_context(cafile=ca_file)
    if not verify:
        log.warning("TLS certificate verification of the hub is DISABLED (verify_tls = false)")
        context.check_hostname = False
        context.verify_mode = ssl_module.CERT_NONE
    return context


class TokenClient:
    """Fetches and caches an OAuth2 client-credentials access token (see module docstring)."""

    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str,
        *,
        ssl: ssl_module.SSLContext | bool = True,
        refresh_margin_s: float = 60.0,
        timeout_s: float = 10.0,
    ) -> None:
        self._base_url = base_url if base_url.endswith("/") else base_url + "/"
        self._client_id = client_id
        self._client_secret = client_secret
        self._ssl = ssl
        self._refresh_margin_s = refresh_margin_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._expires_at = 0.0  # time.monotonic() deadline
        self._refresh_at = 0.0  # when the cached token is due for renewal
        self._lock: asyncio.Lock | None = None
        self.tokens_fetched = 0

    # -- token ------------------------------------------------------------------------------

    @property
    def token(self) -> str | None:
        """The cached token (possibly due for refresh), or ``None``; never does I/O."""
        return self._token

    def refresh_due(self) -> bool:
        """True when the cached token is missing or within the refresh margin of expiry."""
        return self._token is None or time.monotonic() >= self._refresh_at

    def invalidate(self) -> None:
        """The hub said the token is invalid: the next ``get_token()`` fetches a new one.

        :attr:`token` keeps returning the old value until then, so the send path never sees None.
        """
        self._refresh_at = 0.0

    async def get_token(self) -> str:
        """A valid token, cached or fetched now; raises AuthError or HubUnavailableError."""
        if not self.refresh_due():
            return self._token  # type: ignore[return-value]
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.refresh_due():  # another caller may have refreshed while we waited
                await self._fetch_token()
            return self._token  # type: ignore[return-value]

    async def _fetch_token(self) -> None:
        url = urljoin(self._base_url, TOKEN_PATH.lstrip("/"))
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._client_secret,
        }
        status, payload = await self._http("POST", url, data=form)
        if status in _PERMANENT_STATUSES:
            raise AuthError(_auth_failure_text(status, url, self._client_id, payload))
        if status != 200:
            raise HubUnavailableError(f"token request to {url} got HTTP {status}; will retry")
        access_token, expires_in = _parse_token_reply(payload, url)
        now = time.monotonic()
        margin = min(self._refresh_margin_s, expires_in / 2)
        self._token = access_token
        self._expires_at = now + expires_in
        self._refresh_at = self._expires_at - margin
        self.tokens_fetched += 1
        log.info("obtained access token from %s (expires in %.0f s)", url, expires_in)

    # -- REST -------------------------------------------------------------------------------

    async def fetch_json(self, path: str) -> dict[str, Any]:
        """Authenticated ``GET <base><path>`` returning a JSON object (one retry after a 401)."""
        url = urljoin(self._base_url, path.lstrip("/"))
        for attempt in range(2):
            token = await self.get_token()
            headers = {
                "Authorization": f"Bearer {token}",
                "Accept": "application/fhir+json",
                "Cache-Control": "no-cache",
            }
            status, payload = await self._http("GET", url, headers=headers)
            if status == 401 and attempt == 0:
                self.invalidate()
                continue
            if status >= 500 or status == 429:
                raise HubUnavailableError(f"GET {url} failed with HTTP {status}; will retry")
            if status != 200:
                raise HubRequestError(status, url, _error_detail(payload))
            data = _json_object(payload)
            if data is None:
                raise HubUnavailableError(f"GET {url} did not return a JSON object")
            return data
        raise AssertionError("unreachable")  # pragma: no cover

    # -- plumbing ---------------------------------------------------------------------------

    async def _http(self, method: str, url: str, **kwargs: Any) -> tuple[int, bytes]:
        session = self._ensure_session()
        try:
            async with session.request(method, url, ssl=self._ssl, **kwargs) as response:
                return response.status, await response.read()
        except aiohttp.ClientConnectorCertificateError as exc:
            raise HubUnavailableError(
                f"TLS certificate of {url} could not be verified ({exc.certificate_error}); "
                "for a private CA set ca_file"
            ) from None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            raise HubUnavailableError(f"{method} {url} failed: {detail}") from None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # trust_env: honour HTTPS_PROXY/NO_PROXY like the websocket client does.
            self._session = aiohttp.ClientSession(timeout=self._timeout, trust_env=True)
        return self._session

    async def close(self) -> None:
        """Close the HTTP session (the cached token is kept)."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def _json_object(payload: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _error_detail(payload: bytes) -> str:
    """A short, non-PHI description of an error reply (OAuth ``error`` or OperationOutcome)."""
    data = _json_object(payload) or {}
    if "error" in data:
        return " ".join(str(data[k]) for k in ("error", "error_description") if k in data)[:200]
    issues = data.get("issue")
    if isinstance(issues, list) and issues and isinstance(issues[0], dict):
        details = issues[0].get("details")
        if isinstance(details, dict) and "text" in details:
            return str(details["text"])[:200]
    return f"{len(payload)} byte reply"


def _auth_failure_text(status: int, url: str, client_id: str, payload: bytes) -> str:
    if status == 404:
        return f"no OAuth2 token endpoint at {url} (HTTP 404): check the hub base URL"
    return (
        f"the hub refused the client credentials for client_id {client_id!r} at {url} "
        f"(HTTP {status}: {_error_detail(payload)}): check client_id and client_secret"
    )


def _parse_token_reply(payload: bytes, url: str) -> tuple[str, float]:
    data = _json_object(payload)
    token = data.get("access_token") if data else None
    if not isinstance(token, str) or not token:
        raise HubUnavailableError(f"token reply from {url} has no access_token (is it a hub?)")
    expires_in = data.get("expires_in", DEFAULT_EXPIRES_IN_S) if data else DEFAULT_EXPIRES_IN_S
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)
    if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN_S
    return token, float(expires_in)
