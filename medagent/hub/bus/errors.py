"""The bus's error contract: what a caller of an agent operation can be told, and nothing else.

Every failure of :meth:`~medagent.hub.bus.base.AgentBus.request` or ``send`` is one of three
:class:`BusError` subclasses, so the HTTP layer maps them without looking at Redis exceptions:

* :class:`AgentNotConnected` — no hub process holds a socket of that agent (answered at once,
  never after waiting the timeout): Medplum's 400 "Agent not connected";
* :class:`AgentTimeout` — the agent holds a socket but did not answer in time: 400 "Timeout";
* :class:`BusUnavailable` — the routing layer itself (Redis) is unreachable: 503. Requests made
  while Redis is down fail at once with this error instead of waiting their timeout.

:class:`BusConfigError` is a configuration error (bad ``bus`` URL, missing ``redis`` package),
raised by :func:`~medagent.hub.bus.factory.make_bus` before anything starts.
"""

from __future__ import annotations

__all__ = ["AgentNotConnected", "AgentTimeout", "BusConfigError", "BusError", "BusUnavailable"]


class BusError(Exception):
    """A routed agent request that failed; ``str(exc)`` is safe to show to an operator."""


class AgentNotConnected(BusError):
    def __init__(self, agent_id: str) -> None:
        super().__init__(f"agent {agent_id} is not connected to any hub process")
        self.agent_id = agent_id


class AgentTimeout(BusError):
    def __init__(self, agent_id: str, timeout_s: float) -> None:
        super().__init__(f"agent {agent_id} did not answer within {timeout_s:g} s")
        self.agent_id = agent_id


class BusUnavailable(BusError):
    """Redis cannot be reached (or was lost while the request waited)."""


class BusConfigError(ValueError):
    """A ``bus`` setting that cannot be used; the message names the setting and the fix."""
