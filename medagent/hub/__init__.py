"""medagent's own hub: the cloud side that agents connect to (Medplum Agent protocol compatible).

One aiohttp process serves ``/oauth2/token`` (client credentials), ``/ws/agent`` (the agent
websocket with medagent's batching extension), a FHIR R4 read subset for agent configuration,
the Agent operations (``$push``, ``$status``, ``$reload-config``, ``$upgrade``, ``$fetch-logs``,
``$stats``), an operator API, and runs *bots* — Python callables — on inbound messages, keeping
everything in one SQLite store. See docs/hub.md.
"""

from medagent.hub.botrunner import BotEvent, BotReply, inline_bot
from medagent.hub.records import AgentCredentials, AgentStatus, MessageQuery, MessageStatus
from medagent.hub.server import HubServer
from medagent.hub.settings import HubSettings
from medagent.hub.store import HubStore

__all__ = [
    "HubServer",
    "HubSettings",
    "HubStore",
    "AgentCredentials",
    "AgentStatus",
    "MessageQuery",
    "MessageStatus",
    "BotEvent",
    "BotReply",
    "inline_bot",
]
