"""The runtime's authenticated HTTP view of the hub, handed to channel kinds and file uploaders.

It implements :class:`medagent.channels.base.HubClient`: the hub's base URL, the TLS context to
reach it (the agent's ``ca_file``, as the link uses), and ``authorization()``, the
``Bearer <access token>`` header value from the link's :class:`~medagent.cloud.auth.TokenClient`
(the same cached client-credentials token the websocket uses, refreshed when due). It holds no
session of its own: each kind or uploader owns its HTTP client, so this object never needs closing.
"""

from __future__ import annotations

import ssl

from medagent.cloud.auth import TokenClient, build_ssl_context

__all__ = ["RuntimeHubClient"]


class RuntimeHubClient:
    def __init__(self, base_url: str, *, ca_file: str | None = None) -> None:
        self._base_url = base_url.rstrip("/")
        self._tokens: TokenClient | None = None
        self._ssl = build_ssl_context(ca_file) if base_url.startswith("https:") else None

    def attach(self, tokens: TokenClient) -> None:
        """The link's token client (the link is built after the channels' context)."""
        self._tokens = tokens

    def _token_client(self) -> TokenClient:
        if self._tokens is None:
            raise RuntimeError("the hub client has no credentials yet")
        return self._tokens

    @property
    def base_url(self) -> str:
        """Without a trailing slash: join with ``f"{base_url}/fhir/R4/..."``."""
        return self._base_url

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl

    async def authorization(self) -> str:
        return f"Bearer {await self._token_client().get_token()}"

    def invalidate(self) -> None:
        """The hub answered 401: the next authorization() fetches a new token."""
        self._token_client().invalidate()

    def __repr__(self) -> str:
        return f"RuntimeHubClient({self._base_url!r})"
