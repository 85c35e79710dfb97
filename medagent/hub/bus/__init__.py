"""Routing of agent operations to the hub process that holds the agent's socket (issue 20).

``make_bus(url)`` returns a :class:`LocalBus` (one process, no dependencies) or a
:class:`RedisBus` (several ``medagent hub`` processes sharing one Redis; imported only when
asked for, so the optional ``redis`` package stays optional). See :mod:`.base` for the
contract, :mod:`.envelope` for the wire format, docs/scale-out.md for deployment.
"""

from medagent.hub.bus.base import AgentBus, Deliver, Hold, Presence, new_process_id
from medagent.hub.bus.errors import (
    AgentNotConnected,
    AgentTimeout,
    BusConfigError,
    BusError,
    BusUnavailable,
)
from medagent.hub.bus.factory import make_bus
from medagent.hub.bus.local import LocalBus

__all__ = [
    "AgentBus",
    "AgentNotConnected",
    "AgentTimeout",
    "BusConfigError",
    "BusError",
    "BusUnavailable",
    "Deliver",
    "Hold",
    "LocalBus",
    "Presence",
    "make_bus",
    "new_process_id",
]
