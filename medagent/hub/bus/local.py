"""The single-process bus (``medagent serve``, and ``medagent hub`` without ``--bus``).

Every agent socket is in this process, so routing is a direct call to the deliver handler and
presence is a dictionary: no Redis, nothing to configure. What a disconnected agent last
reported (version, time) is kept for ``$status`` until the process ends, as the registry did.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from medagent.cloud.messages import AgentMessage
from medagent.hub.bus.base import AgentBus, Hold, Presence
from medagent.hub.bus.errors import AgentNotConnected

__all__ = ["LocalBus"]


class LocalBus(AgentBus):
    def __init__(self, process_id: str | None = None) -> None:
        super().__init__(process_id)
        self._last: dict[str, Presence] = {}  # agents that were held and are not any more

    async def close(self) -> None:
        for hold in list(self._holds.values()):
            await self.detach(hold)

    async def _announce(self, hold: Hold) -> None:
        self._last.pop(hold.agent_id, None)

    async def _release(self, hold: Hold) -> None:
        self._last[hold.agent_id] = Presence(False, hold.version, time.time())

    async def request(self, agent_id: str, message: AgentMessage, timeout_s: float) -> AgentMessage:
        self._check_request(message, timeout_s)
        if agent_id not in self._holds:
            raise AgentNotConnected(agent_id)
        return await self._request_here(agent_id, message, timeout_s)

    async def send(self, agent_id: str, message: AgentMessage) -> None:
        if agent_id not in self._holds:
            raise AgentNotConnected(agent_id)
        await self._send_here(agent_id, message)

    async def presence_many(self, agent_ids: Sequence[str]) -> dict[str, Presence]:
        out: dict[str, Presence] = {}
        for agent_id in agent_ids:
            hold = self._holds.get(agent_id)
            out[agent_id] = hold.presence(self.process_id) if hold else self._last.get(agent_id, Presence(False))
        return out
