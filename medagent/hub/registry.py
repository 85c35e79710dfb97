"""Which socket of this process is an agent's, and who waits for which reply.

Theory of operation
-------------------
* :class:`AgentRegistry` maps an agent id to its *current* connection in this process: the
  newest successful ``agent:connect:request`` wins, and a closing connection unregisters only
  itself. Presence (connected, version, last heard from) is the hub bus's
  (:mod:`medagent.hub.bus`), which every hub process can read; the registry only finds the
  socket to write to.
* :class:`PendingReplies` maps a callback to the future of an operation waiting for the
  agent's answer (medplum-protocol.md §2, "published to the channel named by the callback").
  A reply for an unknown or expired callback is dropped.
"""

from __future__ import annotations

import asyncio
from typing import Generic, Protocol, TypeVar

from medagent.cloud.messages import AgentMessage

__all__ = ["AgentRegistry", "Connection", "PendingReplies"]


class Connection(Protocol):
    """What the hub needs of an agent's connection (``hub/websocket.py`` implements it).

    Typed here, beside the registry that holds connections, so that the context and the
    operations need not import the websocket module (which imports the context).
    """

    @property
    def agent_id(self) -> str | None: ...

    async def send(self, message: AgentMessage) -> None: ...

    async def send_many(self, messages: list[AgentMessage]) -> None: ...

    def send_now(self, messages: list[AgentMessage]) -> None: ...

    async def close(self) -> None: ...


C = TypeVar("C", bound=Connection)


class AgentRegistry(Generic[C]):
    def __init__(self) -> None:
        self._connections: dict[str, C] = {}

    def register(self, agent_id: str, connection: C) -> None:
        self._connections[agent_id] = connection

    def unregister(self, agent_id: str, connection: C) -> None:
        if self._connections.get(agent_id) is connection:
            del self._connections[agent_id]

    def current(self, agent_id: str) -> C | None:
        return self._connections.get(agent_id)

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
