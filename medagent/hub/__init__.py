"""medagent's own hub: the cloud side that agents connect to (Medplum Agent protocol compatible).

One aiohttp process serves ``/oauth2/token`` (client credentials), ``/ws/agent`` (the agent
websocket with medagent's batching extension), a FHIR R4 read subset for agent configuration,
the Agent operations (``$push``, ``$status``, ``$reload-config``, ``$upgrade``, ``$fetch-logs``,
``$stats``), an operator API, and runs *bots* — Python callables — on inbound messages, keeping
everything in a store: one SQLite file, or PostgreSQL for several hub processes. See docs/hub.md
and docs/hub-store.md.

The names below are loaded on first use (PEP 562): the agent process imports a few hub modules
(``medagent.hub.releases``) and must not load the server, the store or its database driver.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AgentCredentials",
    "AgentStatus",
    "BotEvent",
    "BotReply",
    "HubServer",
    "HubSettings",
    "HubStore",
    "MessageQuery",
    "MessageStatus",
    "inline_bot",
]

_HOMES = {
    "BotEvent": "medagent.hub.botrunner", "BotReply": "medagent.hub.botrunner", "inline_bot": "medagent.hub.botrunner",
    "AgentCredentials": "medagent.hub.records", "AgentStatus": "medagent.hub.records",
    "MessageQuery": "medagent.hub.records", "MessageStatus": "medagent.hub.records",
    "HubServer": "medagent.hub.server", "HubSettings": "medagent.hub.settings", "HubStore": "medagent.hub.store",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'medagent.hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
