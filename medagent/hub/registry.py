"""Who is connected, and who waits for which reply.

Theory of operation
-------------------
One hub process holds every agent socket it accepted (Medplum spreads this over Redis pub/sub;
a single medagent hub needs only dictionaries, and a future scale-out routes requests to the
process that holds the socket).

* :class:`AgentRegistry` maps an agent id to its *current* connection: the newest successful
  ``agent:connect:request`` wins, and a closing connection unregisters only itself. It also keeps
  what ``$status`` reports: the version from the last heartbeat response and when the agent was
  last heard from.
* :class:`PendingReplies` maps a callback to the future of an HTTP operation waiting for the
  agent's answer (medplum-protocol.md §2, "published to the channel named by the callback").
  A reply for an unknown or expired callback is dropped.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from medagent.cloud.messages import AgentMessage

__all__ = ["AgentRegistry", "AgentPresence", "PendingReplies", "Connection"]


class Connection(Protocol):
    """What the hub needs of an agent's connection (``hub/websocket.py`` implements it).

    Typed here, beside the registry that holds connections, so that the context and the
    operations need not import the websocket module (which imports the context).
    """

    @property
    def agent_id(self) -> str | None: ...

    async def send(self, message: AgentMessage) -> None: ...

    async def send_many(self, messages: list[AgentMessage]) -> None: ...

    async def close(self) -> None: ...


C = TypeVar("C", bound=Connection)


@dataclass(frozen=True, slots=True)
class AgentPresence:
    """What ``$status`` reports for one agent."""

    connected: bool
    version: str | None
    last_updated: float | None  #: epoch seconds


class AgentRegistry(Generic[C]):
    def __init__(self) -> None:
        self._connections: dict[str, C] = {}
        self._versions: dict[str, str] = {}
        self._last_seen: dict[str, float] = {}

    def register(self, agent_id: str, connection: C) -> None:
        self._connections[agent_id] = connection
        self.touch(agent_id)

    def unregister(self, agent_id: str, connection: C) -> None:
        if self._connections.get(agent_id) is connection:
            del self._connections[agent_id]
            self.touch(agent_id)

    def current(self, agent_id: str) -> C | None:
        return self._connections.get(agent_id)

    def touch(self, agent_id: str, version: str | None = None) -> None:
        self._last_seen[agent_id] = time.time()
        if version is not None:
            self._versions[agent_id] = version

    def presence(self, agent_id: str) -> AgentPresence:
        return AgentPresence(agent_id in self._connections, self._versions.get(agent_id), self._last_seen.get(agent_id))

    def connections(self) -> list[C]:
        return list(self._connections.values())

    def __len__(self) -> int:
        return len(self._connections)


class PendingReplies:
    """Futures of HTTP operations waiting for an agent's reply, keyed by callback."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[AgentMessage]] = {}

    def expect(self, callback: str) -> asyncio.Future[AgentMessage]:
        future: asyncio.Future[AgentMessage] = asyncio.get_running_loop().create_future()
        self._waiting[callback] = future
        return future

    def resolve(self, callback: str, message: AgentMessage) -> bool:
        """Hand ``message`` to whoever waits for ``callback``; False if nobody does."""
        future = self._waiting.pop(callback, None)
        if future is None or future.done():
            return False
        future.set_result(message)
        return True

    def forget(self, callback: str) -> None:
        self._waiting.pop(callback, None)

    def cancel_all(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            future.cancel()
