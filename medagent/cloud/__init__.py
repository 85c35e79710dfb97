"""The agent <-> hub protocol: typed messages, OAuth2 client credentials, and the websocket link.

* :mod:`medagent.cloud.messages` — every Medplum Agent message type plus medagent's batching
  extension, encoded with orjson (medplum-protocol.md §0, §2); the package's one encoder.
* :mod:`medagent.cloud.auth` — :class:`TokenClient` (``POST /oauth2/token``, cached and renewed
  before expiry) and authenticated REST reads.
* :mod:`medagent.cloud.wsclient` — a websocket client transport over websockets' sans-I/O
  protocol (public API), writing many frames in one socket write.
* :mod:`medagent.cloud.link` — :class:`AgentLink`, the agent's websocket to the hub: the I/O skin
  around :mod:`medagent.proto.agent_session` (connect, heartbeats, reconnect with backoff,
  batching when the hub advertises it).

The names below are loaded on first use, so that importing :mod:`medagent.cloud.messages` (as the
pure protocol core and the hub do) does not import aiohttp or websockets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medagent.cloud.auth import AuthError, HubRequestError, HubUnavailableError, TokenClient
    from medagent.cloud.link import (
        AgentLink,
        LinkConfigError,
        LinkHandler,
        LinkSettings,
        LinkState,
        websocket_url,
    )
    from medagent.cloud.messages import AgentMessage, ProtocolError, UnknownMessageType

_WHERE = {
    "AgentLink": "link",
    "LinkConfigError": "link",
    "LinkHandler": "link",
    "LinkSettings": "link",
    "LinkState": "link",
    "websocket_url": "link",
    "AuthError": "auth",
    "HubRequestError": "auth",
    "HubUnavailableError": "auth",
    "TokenClient": "auth",
    "AgentMessage": "messages",
    "ProtocolError": "messages",
    "UnknownMessageType": "messages",
}

__all__ = [
    "AgentLink",
    "AgentMessage",
    "AuthError",
    "HubRequestError",
    "HubUnavailableError",
    "LinkConfigError",
    "LinkHandler",
    "LinkSettings",
    "LinkState",
    "ProtocolError",
    "TokenClient",
    "UnknownMessageType",
    "websocket_url",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'medagent.cloud' has no attribute {name!r}")
    return getattr(importlib.import_module(f"medagent.cloud.{module}"), name)
