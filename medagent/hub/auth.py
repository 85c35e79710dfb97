"""Credentials and tokens of the hub: client secrets, agent access tokens, the admin token.

Theory of operation
-------------------
* An agent authenticates with OAuth2 client credentials (RFC 6749 §4.4). Its ``client_secret``
  is 32 random bytes (URL-safe base64), shown once; the store keeps only
  ``scrypt$n$r$p$<salt>$<hash>`` (:func:`hash_secret`), compared in constant time.
* An access token is a JWT (RFC 7519) in compact JWS form (RFC 7515) signed with HMAC-SHA256
  (``alg: HS256``), base64url ``header.payload.signature``. The payload holds the claims
  Medplum's server issues that a client checks: ``sub`` (the agent id), ``client_id`` (the client
  that logged in: ``@medplum/core``'s ``MedplumClient.verifyTokens`` refuses a token whose
  ``client_id`` differs from its own client id, "Token not issued for this audience"), ``iss``
  (the hub's base URL as the client reached it), ``iat`` and ``exp`` (epoch seconds, RFC 7519
  §4.1.6/§4.1.4); plus ``gen``, the agent's token generation (revocation, below). No
  ``login_id``: MedplumClient takes that claim as "a Medplum server" and then fetches
  ``GET /auth/me`` for a user profile, project and membership this hub does not have; the agent
  needs none of them (tried with Medplum's agent v4.5.2: login, config, websocket all work).
* Revocation: every agent has a token generation (a counter in the store). A token carries the
  generation current when it was issued; :meth:`TokenSigner.verify` with a ``generation_of``
  lookup (:meth:`TokenSigner.verify_current`) refuses a token whose generation is no longer current (one primary-key read). The
  counter moves on ``POST /admin/agents/{id}/revoke-tokens``, when the agent is set ``off`` and
  when its secret is rotated. The signing key is 32 random bytes generated on first start.
* The operator API takes ``Authorization: Bearer <admin token>``; the admin token is generated on
  first start unless the settings give one.
* Both secrets are hub-wide (:func:`load_shared_secret`): the store's ``hub_secrets`` table holds
  them, so every hub process of one store (each with its own data directory) signs and checks
  with the same key and accepts the same admin token. The first process to start stores them
  (seeded from ``<data_dir>/hub-signing-key`` / ``admin-token`` when an older hub left those
  files, so its tokens stay valid); every process keeps a copy in those files (0600) for the
  operator and local tools. Deleting the ``hub_secrets`` row of the key revokes every token.

Invariants: no secret or token is ever logged; every comparison of secret material uses
:func:`hmac.compare_digest`; key files are created with mode 0600 atomically (O_EXCL), so a
half-written key is never read.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from medagent.storage.files import tighten_file, write_private_file

__all__ = [
    "ADMIN_TOKEN_FILE",
    "SIGNING_KEY_FILE",
    "AccessToken",
    "AuthError",
    "TokenSigner",
    "bearer_token",
    "hash_secret",
    "load_or_create_secret_file",
    "load_shared_secret",
    "new_client_secret",
    "verify_secret",
]

SIGNING_KEY_FILE = "hub-signing-key"
ADMIN_TOKEN_FILE = "admin-token"

_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
_JWT_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")


class AuthError(ValueError):
    """A token or credential that does not authenticate; the message says why (never the secret)."""


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A verified agent access token."""

    agent_id: str
    issued_at: int
    expires_at: int
    client_id: str = ""
    generation: int = 0


def new_client_secret() -> str:
    """A fresh client secret: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """Salted scrypt hash of ``secret`` in a self-describing text form."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    """True when ``secret`` matches the :func:`hash_secret` output ``stored``."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(
            secret.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


class TokenSigner:
    """Issues and verifies HS256 access tokens for agents.

    ``await generation_of(agent_id)`` returns the agent's current token generation, or ``None``
    for an agent that does not exist; without it only signature and expiry are checked.
    """

    def __init__(self, key: bytes, ttl_s: int, generation_of: Callable[[str], Awaitable[int | None]] | None = None) -> None:
        if len(key) < 32:
            raise ValueError("the token signing key must be at least 32 bytes")
        self._key = key
        self.ttl_s = ttl_s
        self._generation_of = generation_of

    def issue(self, agent_id: str, now: float | None = None, *, client_id: str = "", generation: int = 0,
              issuer: str | None = None) -> str:
        issued = int(time.time() if now is None else now)
        claims: dict[str, object] = {"sub": agent_id, "client_id": client_id, "gen": generation}
        if issuer:
            claims["iss"] = issuer
        claims["iat"], claims["exp"] = issued, issued + self.ttl_s
        signing_input = _JWT_HEADER + b"." + _b64(orjson.dumps(claims)).encode()
        return (signing_input + b"." + _b64(self._sign(signing_input)).encode()).decode()

    def verify(self, token: str, now: float | None = None) -> AccessToken:
        """The token's claims; raises :class:`AuthError` if forged, malformed or expired (the
        revocation check needs the store: :meth:`verify_current`)."""
        parts = token.encode().split(b".")
        if len(parts) != 3 or parts[0] != _JWT_HEADER:
            raise AuthError("malformed access token")
        try:
            signature = _unb64(parts[2].decode())
        except ValueError:
            raise AuthError("malformed access token") from None
        if not hmac.compare_digest(signature, self._sign(parts[0] + b"." + parts[1])):
            raise AuthError("access token signature does not match")
        try:
            claims = orjson.loads(_unb64(parts[1].decode()))
            agent_id, issued, expires = claims["sub"], int(claims["iat"]), int(claims["exp"])
            client_id, generation = str(claims.get("client_id", "")), int(claims.get("gen", 0))
        except (ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError):
            raise AuthError("malformed access token claims") from None
        if not isinstance(agent_id, str) or (time.time() if now is None else now) >= expires:
            raise AuthError("access token expired")
        return AccessToken(agent_id, issued, expires, client_id, generation)

    async def verify_current(self, token: str, now: float | None = None) -> AccessToken:
        """Like :meth:`verify`, and refuse a revoked token (its generation is no longer the
        agent's, read from the store through ``generation_of``) or one of an unknown agent."""
        claims = self.verify(token, now)
        if self._generation_of is not None:
            current = await self._generation_of(claims.agent_id)
            if current is None:
                raise AuthError("access token of an unknown agent")
            if current != claims.generation:
                raise AuthError("access token revoked")
        return claims

    def _sign(self, signing_input: bytes) -> bytes:
        return hmac.new(self._key, signing_input, hashlib.sha256).digest()


def load_or_create_secret_file(path: Path, make: bytes) -> bytes:
    """Read the secret in ``path``, or write ``make`` there (mode 0600, exclusive create)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        tighten_file(path)  # made by an older medagent or by hand: never readable by others
        content = path.read_bytes()
        if not content.strip():
            raise ValueError(f"{path} is empty; delete it to have a new secret generated") from None
        return content.strip()
    with os.fdopen(fd, "wb") as f:
        f.write(make)
    return make


async def load_shared_secret(stored: Callable[[str, str], Awaitable[str]], path: Path, name: str,
                             make: Callable[[], str]) -> str:
    """The hub-wide secret ``name``: ``await stored(name, proposed)`` returns the value in the
    store, storing ``proposed`` if there is none yet (the local copy ``path``, if an older hub
    left one, else ``make()``). ``path`` is then made to hold the stored value (mode 0600)."""
    local: str | None = None
    if path.is_file():
        tighten_file(path)
        local = path.read_text().strip()
        if not local:
            raise ValueError(f"{path} is empty; delete it to have the hub's secret copied there again")
    value = await stored(name, local or make())
    if value != local:
        write_private_file(path, value.encode())
    return value


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("bad base64url") from exc
