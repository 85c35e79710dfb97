"""The agent <-> hub protocol: typed messages, OAuth2 client credentials, and the websocket link.

* :mod:`medagent.cloud.messages` — every Medplum Agent message type plus medagent's batching
  extension, encoded with orjson (medplum-protocol.md §0, §2).
* :mod:`medagent.cloud.auth` — :class:`TokenClient` (``POST /oauth2/token``, cached and renewed
  before expiry) and authenticated REST reads.
* :mod:`medagent.cloud.link` — :class:`AgentLink`, the agent's websocket to the hub: connect,
  heartbeats, reconnect with backoff, batching when the hub advertises it.
"""

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
