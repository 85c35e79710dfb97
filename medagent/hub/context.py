"""Everything a request handler of the hub needs, in one object (built by :class:`HubServer`).

Connections are typed by the :class:`~medagent.hub.registry.Connection` protocol, not by the
websocket module's class: ``hub/websocket.py`` imports this module, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from medagent.hub.auth import TokenSigner
from medagent.hub.botrunner import BotRunner
from medagent.hub.bus import AgentBus
from medagent.hub.intake import ChannelDispatcher
from medagent.hub.registry import AgentRegistry, Connection, PendingReplies
from medagent.hub.settings import HubSettings
from medagent.hub.store import HubStore
from medagent.hub.upgrades import UpgradeWatcher
from medagent.hub.writer import StoreWriter

__all__ = ["CONNECTIONS_KEY", "CTX_KEY", "HubContext"]


@dataclass(frozen=True, slots=True)
class HubContext:
    settings: HubSettings
    store: HubStore
    writer: StoreWriter
    signer: TokenSigner
    bots: BotRunner
    registry: AgentRegistry[Connection]
    pending: PendingReplies
    dispatcher: ChannelDispatcher
    admin_token: str
    #: routes agent operations to the process holding the socket, and answers presence
    bus: AgentBus
    #: follows accepted $upgrade requests to their outcome (the upgrade part of $status)
    upgrades: UpgradeWatcher


#: the application keys under which HubServer stores the context and the open agent sockets
CTX_KEY: web.AppKey[HubContext] = web.AppKey("medagent_hub_context", HubContext)
CONNECTIONS_KEY: web.AppKey[set[Connection]] = web.AppKey("medagent_hub_connections", set)
