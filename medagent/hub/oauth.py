"""``POST /oauth2/token``: the OAuth2 client-credentials grant (RFC 6749 §4.4) for agents.

The client authenticates with ``client_id``/``client_secret`` in the form body
(application/x-www-form-urlencoded) or with HTTP Basic (RFC 6749 §2.3.1). Success returns
``{"access_token", "token_type": "Bearer", "expires_in"}`` with ``Cache-Control: no-store``
(§5.1). Errors follow §5.2: an unsupported grant type -> 400 ``unsupported_grant_type``; a
missing client id or secret -> 400 ``invalid_request``; an unknown client or a wrong secret ->
401 ``invalid_client``. Secret checks (scrypt, tens of ms) run off the event loop, and an
unknown client id costs the same work as a wrong secret.

Rate limit (issue 18): every request takes a token from its client address's bucket before the
form is read, and from its client id's bucket before the secret is checked, so guessing secrets
or burning the hub's CPU on scrypt is bounded per address and per client. An empty bucket ->
429 ``{"error": "too_many_requests"}`` with ``Retry-After`` (RFC 6585 §4), logged as one
rate-limited line. The access token carries ``client_id`` (see :mod:`medagent.hub.auth`) and
``iss``, the base URL the client used.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import urllib.parse
from dataclasses import dataclass

import orjson
from aiohttp import web

from medagent.hub.auth import hash_secret, verify_secret
from medagent.hub.context import CTX_KEY
from medagent.hub.ratelimit import RateLimiter
from medagent.ops.logs import RateLimitedLog

__all__ = ["TOKEN_LIMITS_KEY", "TokenLimits", "add_oauth_routes", "token_endpoint"]

log = logging.getLogger(__name__)
_limited_log = RateLimitedLog(log)

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@functools.cache
def _dummy_hash() -> str:
    """A hash to check unknown client ids against, so they cost as much as a wrong secret."""
    return hash_secret("medagent-hub-timing-equaliser")


def _oauth_error(status: int, error: str, description: str, basic: bool = False) -> web.Response:
    headers = dict(_NO_STORE)
    if status == 401 and basic:
        headers["WWW-Authenticate"] = 'Basic realm="medagent-hub"'
    return web.Response(
        body=orjson.dumps({"error": error, "error_description": description}),
        status=status, content_type="application/json", headers=headers,
    )


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return None
    return urllib.parse.unquote(client_id), urllib.parse.unquote(secret)


@dataclass(frozen=True, slots=True)
class TokenLimits:
    """The token endpoint's two rate limiters (one per client address, one per client id)."""

    per_address: RateLimiter
    per_client: RateLimiter


TOKEN_LIMITS_KEY: web.AppKey[TokenLimits] = web.AppKey("medagent_hub_token_limits", TokenLimits)


def _too_many(kind: str, key: str, wait_s: float) -> web.Response:
    _limited_log.warning(f"token-{kind}", "token requests over the limit for %s %r", kind, key[:64])
    response = _oauth_error(429, "too_many_requests", f"too many token requests for this {kind}; retry later")
    response.headers["Retry-After"] = RateLimiter.retry_after(wait_s)
    return response


async def token_endpoint(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    limits = request.app[TOKEN_LIMITS_KEY]
    address = request.remote or "unknown"
    wait = limits.per_address.take(address)
    if wait:
        return _too_many("address", address, wait)
    form = await request.post()
    if form.get("grant_type") != "client_credentials":
        return _oauth_error(400, "unsupported_grant_type", "only grant_type=client_credentials is supported")
    basic = _basic_credentials(request.headers.get("Authorization"))
    client_id, secret = basic if basic else (form.get("client_id"), form.get("client_secret"))
    if not isinstance(client_id, str) or not isinstance(secret, str) or not client_id or not secret:
        return _oauth_error(400, "invalid_request", "client_id and client_secret are required")
    wait = limits.per_client.take(client_id)
    if wait:
        return _too_many("client", client_id, wait)
    found = await ctx.store.client_secret_hash(client_id)
    stored_hash = found[1] if found else _dummy_hash()
    matches = await asyncio.get_running_loop().run_in_executor(None, verify_secret, secret, stored_hash)
    if found is None or not matches:
        return _oauth_error(401, "invalid_client", "unknown client or wrong client secret", basic is not None)
    agent_id, _, generation = found
    token = ctx.signer.issue(agent_id, client_id=client_id, generation=generation, issuer=_issuer(request))
    return web.Response(
        body=orjson.dumps({"access_token": token, "token_type": "Bearer", "expires_in": ctx.signer.ttl_s}),
        content_type="application/json", headers=_NO_STORE,
    )


def _issuer(request: web.Request) -> str:
    """The hub's base URL as this client reached it (Medplum's ``iss`` is its base URL)."""
    return f"{request.scheme}://{request.host}/"


def add_oauth_routes(app: web.Application) -> None:
    """The token endpoint; its rate limits come from the settings in ``app[CTX_KEY]``."""
    settings = app[CTX_KEY].settings
    app[TOKEN_LIMITS_KEY] = TokenLimits(
        RateLimiter(settings.token_requests_per_address_per_min, settings.token_burst_per_address),
        RateLimiter(settings.token_requests_per_client_per_min, settings.token_burst_per_client),
    )
    app.router.add_post("/oauth2/token", token_endpoint)
