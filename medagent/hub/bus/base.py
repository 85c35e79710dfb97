"""The :class:`AgentBus` contract: reach the hub process that holds an agent's socket.

Theory of operation
-------------------
An agent's websocket lands on one hub process; an HTTP operation for that agent (``$push``,
``$reload-config``, ``$upgrade``, ``$stats``, ``$fetch-logs``) may arrive on any process. The bus
carries the operation's frame to the holder and the agent's answer back:

* the holding process calls :meth:`AgentBus.attach` when an agent's handshake succeeds (it gets
  a :class:`Hold` back) and :meth:`AgentBus.detach` with that hold when the socket closes; a
  detach of a hold that a newer connection replaced does nothing (newest connection wins, as in
  :class:`~medagent.hub.registry.AgentRegistry`);
* any process calls :meth:`AgentBus.request` (frame with a callback, waits for the answer, up to
  a timeout) or :meth:`AgentBus.send` (fire-and-forget: ``$push`` without ``waitForResponse``);
* on the holder, the bus calls the :data:`Deliver` handler it was started with, which puts the
  frame on the local socket and, for a request, waits for the frame that echoes its callback;
* :meth:`AgentBus.touch` records heartbeats and the agent's version in memory only (it runs for
  every inbound frame: the hot path never waits for the bus); :meth:`AgentBus.presence` answers
  ``$status`` from what the holders publish.

Error contract (:mod:`medagent.hub.bus.errors`): ``request``/``send`` raise
:class:`AgentNotConnected` at once when no process holds the agent, :class:`AgentTimeout` when
the agent does not answer in time, :class:`BusUnavailable` at once while the bus's transport is
down. ``attach``/``detach``/``touch`` never raise for a transport failure: the agent keeps
working on its process, and the bus re-announces it when the transport is back.

A request for an agent held by *this* process is delivered by a direct call in every
implementation: a single process never pays for a round trip through Redis.
"""

from __future__ import annotations

import abc
import asyncio
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from medagent.cloud.messages import AgentMessage
from medagent.hub.bus.errors import AgentNotConnected, AgentTimeout

__all__ = ["AgentBus", "Deliver", "Hold", "Presence", "new_process_id"]

#: ``deliver(agent_id, message, timeout_s)``: put ``message`` on this process's socket of the
#: agent. ``timeout_s=None``: send only, return None. Otherwise wait up to ``timeout_s`` for the
#: frame that echoes ``message.callback`` and return it (raising TimeoutError when none comes).
#: Raises AgentNotConnected (or ConnectionError) when this process has no open socket of it.
Deliver = Callable[[str, AgentMessage, "float | None"], Awaitable["AgentMessage | None"]]


def new_process_id() -> str:
    """Unique per hub process start: host, pid and a random suffix (a restarted pid differs)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class Presence:
    """What ``$status`` reports for one agent, whichever hub process holds its socket."""

    connected: bool
    version: str | None = None
    last_updated: float | None = None  #: epoch seconds: last heartbeat, connect or disconnect
    process_id: str | None = None  #: the hub process holding the socket, while connected
    connected_since: float | None = None  #: epoch seconds, while connected


class Hold:
    """This process holds a socket of ``agent_id`` (returned by attach, handed back to detach).

    ``owned`` is False while another process holds a newer socket of the same agent: requests
    then go there, not here.
    """

    __slots__ = ("agent_id", "heartbeat", "owned", "since", "version")

    def __init__(self, agent_id: str, version: str | None) -> None:
        self.agent_id = agent_id
        self.since = self.heartbeat = time.time()
        self.version = version
        self.owned = True

    def presence(self, process_id: str) -> Presence:
        return Presence(True, self.version, self.heartbeat, process_id, self.since)


class AgentBus(abc.ABC):
    """Routing of agent operations to the process holding the agent's socket (see module doc)."""

    def __init__(self, process_id: str | None = None) -> None:
        self.process_id = process_id or new_process_id()
        self._holds: dict[str, Hold] = {}
        self._deliver: Deliver | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, deliver: Deliver) -> None:
        """Begin serving: ``deliver`` puts frames on this process's agent sockets."""
        if self._deliver is not None:
            raise RuntimeError("the bus is already started")
        self._deliver = deliver

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop; every agent this process held shows disconnected at once."""

    @property
    def available(self) -> bool:
        """False while the transport is down (requests then fail fast with BusUnavailable)."""
        return True

    # -- the holding side ---------------------------------------------------------------------

    async def attach(self, agent_id: str, version: str | None = None) -> Hold:
        """This process now holds the newest socket of ``agent_id``."""
        hold = Hold(agent_id, version)
        self._holds[agent_id] = hold
        await self._announce(hold)
        return hold

    async def detach(self, hold: Hold) -> None:
        """The socket of ``hold`` closed; nothing happens if a newer hold replaced it."""
        if self._holds.get(hold.agent_id) is not hold:
            return
        del self._holds[hold.agent_id]
        await self._release(hold)

    def touch(self, agent_id: str, version: str | None = None) -> None:
        """The agent was heard from (and reported ``version``); memory only, never waits."""
        hold = self._holds.get(agent_id)
        if hold is not None:
            hold.heartbeat = time.time()
            if version is not None:
                hold.version = version

    def held(self) -> list[str]:
        """Agent ids whose socket this process holds (owned or not)."""
        return list(self._holds)

    @abc.abstractmethod
    async def _announce(self, hold: Hold) -> None: ...

    @abc.abstractmethod
    async def _release(self, hold: Hold) -> None: ...

    # -- the requesting side ------------------------------------------------------------------

    @abc.abstractmethod
    async def request(self, agent_id: str, message: AgentMessage, timeout_s: float) -> AgentMessage:
        """Send ``message`` (which carries a callback) to the agent and return its answer."""

    @abc.abstractmethod
    async def send(self, agent_id: str, message: AgentMessage) -> None:
        """Send ``message`` to the agent without waiting for an answer."""

    @abc.abstractmethod
    async def presence_many(self, agent_ids: Sequence[str]) -> dict[str, Presence]: ...

    async def presence(self, agent_id: str) -> Presence:
        return (await self.presence_many([agent_id]))[agent_id]

    # -- local delivery, shared by every implementation ----------------------------------------

    def _owned_here(self, agent_id: str) -> bool:
        hold = self._holds.get(agent_id)
        return hold is not None and hold.owned

    async def _request_here(self, agent_id: str, message: AgentMessage, timeout_s: float) -> AgentMessage:
        deliver = self._started()
        try:
            reply = await asyncio.wait_for(deliver(agent_id, message, timeout_s), timeout_s)
        except TimeoutError:
            raise AgentTimeout(agent_id, timeout_s) from None
        except ConnectionError:
            raise AgentNotConnected(agent_id) from None
        if reply is None:
            raise TypeError("the bus's deliver handler returned no reply for a request")
        return reply

    async def _send_here(self, agent_id: str, message: AgentMessage) -> None:
        try:
            await self._started()(agent_id, message, None)
        except ConnectionError:
            raise AgentNotConnected(agent_id) from None

    def _started(self) -> Deliver:
        if self._deliver is None:
            raise RuntimeError("the bus is not started")
        return self._deliver

    @staticmethod
    def _check_request(message: AgentMessage, timeout_s: float) -> None:
        if getattr(message, "callback", None) is None:
            raise ValueError(f"a routed {message.TYPE} request needs a callback to match its answer")
        if not timeout_s > 0:
            raise ValueError(f"timeout must be positive, not {timeout_s!r}")
