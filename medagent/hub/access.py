"""Who is calling the hub's HTTP API: the operator (admin token) or an agent (its access token).

``Authorization: Bearer <token>`` is compared with the admin token in constant time first; any
other bearer token must be a valid agent access token (:class:`medagent.hub.auth.TokenSigner`).
A request without a usable token gets 401 with an ``OperationOutcome`` and a
``WWW-Authenticate: Bearer`` header (RFC 6750 §3); an agent asking for an operator resource gets
403.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import web

from medagent.hub.auth import AuthError, bearer_token
from medagent.hub.context import CTX_KEY
from medagent.hub.fhir_json import outcome_error

__all__ = ["Principal", "principal", "require_admin"]


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: the operator (``agent_id is None``) or one agent."""

    agent_id: str | None

    @property
    def is_admin(self) -> bool:
        return self.agent_id is None

    def may_read_agent(self, agent_id: str) -> bool:
        return self.is_admin or self.agent_id == agent_id


async def principal(request: web.Request) -> Principal:
    """The caller of ``request``; raises 401 when it carries no valid token."""
    ctx = request.app[CTX_KEY]
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        raise _unauthorized("Missing bearer token (Authorization: Bearer <token>)")
    if hmac.compare_digest(token.encode(), ctx.admin_token.encode()):
        return Principal(None)
    try:
        return Principal((await ctx.signer.verify_current(token)).agent_id)
    except AuthError as exc:
        raise _unauthorized(f"Invalid access token: {exc}") from None


async def require_admin(request: web.Request) -> Principal:
    """The caller, who must hold the admin token (401 without a token, 403 for an agent)."""
    caller = await principal(request)
    if not caller.is_admin:
        raise web.HTTPForbidden(
            text=outcome_error("This operation requires the hub's admin token", "forbidden").decode(),
            content_type="application/fhir+json",
        )
    return caller


def _unauthorized(text: str) -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(
        text=outcome_error(text, "login").decode(),
        content_type="application/fhir+json",
        headers={"WWW-Authenticate": 'Bearer realm="medagent-hub"'},
    )
