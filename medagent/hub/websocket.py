"""The hub side of one agent websocket, ``/ws/agent`` (medplum-protocol.md §1.2, §1.3, §2).

Theory of operation
-------------------
A connection starts in ``AWAITING_CONNECT``. The agent's ``agent:connect:request`` is checked
like Medplum's ``handleConnect``: a missing ``accessToken`` -> ``agent:error "Missing access
token"``, a missing ``agentId`` -> ``"Missing agent ID"``, a forged, expired or foreign token
(one whose agent is not ``agentId``), or an unknown agent -> ``"Invalid access token"``. Those
errors carry no callback and leave the socket open, so the agent may retry. On success the
connection becomes the agent's current one in the registry, goes ``LIVE``, starts the server
heartbeat (``agent:heartbeat:request`` every ``heartbeat_interval_s``) and answers
``agent:connect:response`` with ``features.batch = {maxMessages, maxBytes}`` (the medagent
batching extension, see :mod:`medagent.cloud.messages`).

While live: heartbeat requests are answered with the hub version; heartbeat responses record
the agent version for ``$status``; transmit requests (alone or inside ``agent:batch``) go to the
:class:`~medagent.hub.intake.IntakePipeline`; responses and ``agent:error`` frames that carry a
callback resolve the HTTP operation waiting for it. Frames that are not JSON, lack fields, have
an unknown type, or make no sense towards the hub get ``agent:error`` with the callback when it
could be read. Text and binary frames are both accepted (UTF-8 JSON).

Invariants: the hub never closes a socket because of a bad frame; a connection registers only
after a valid handshake and unregisters only itself; nothing logs frame contents.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from medagent import __version__
from medagent.cloud.messages import (
    AgentMessage,
    Batch,
    BatchAck,
    ConnectRequest,
    ConnectResponse,
    ErrorMessage,
    HeartbeatRequest,
    HeartbeatResponse,
    LogsResponse,
    ProtocolError,
    ReloadConfigResponse,
    StatsResponse,
    TransmitRequest,
    TransmitResponse,
    UnknownMessageType,
    UpgradeResponse,
    decode_dict,
    encode,
)
from medagent.hub.auth import AuthError
from medagent.hub.context import CONNECTIONS_KEY, CTX_KEY, HubContext
from medagent.hub.intake import IntakePipeline
from medagent.hub.store import NotFound

__all__ = [
    "AgentConnection",
    "ConnectionState",
    "handle_agent_websocket",
    "MISSING_ACCESS_TOKEN",
    "MISSING_AGENT_ID",
    "INVALID_ACCESS_TOKEN",
]

log = logging.getLogger(__name__)

MISSING_ACCESS_TOKEN = "Missing access token"
MISSING_AGENT_ID = "Missing agent ID"
INVALID_ACCESS_TOKEN = "Invalid access token"
NOT_CONNECTED = "Not connected: send agent:connect:request first"

#: replies from the agent that settle an HTTP operation waiting on their callback
_REPLY_TYPES = (TransmitResponse, ReloadConfigResponse, UpgradeResponse, LogsResponse, StatsResponse, ErrorMessage)


class ConnectionState(enum.IntEnum):
    AWAITING_CONNECT = 0
    LIVE = 1
    CLOSED = 2


class AgentConnection:
    """One agent websocket: handshake, heartbeats, frame dispatch."""

    def __init__(self, ctx: HubContext, ws: web.WebSocketResponse, peer: str) -> None:
        self._ctx = ctx
        self._ws = ws
        self.peer = peer
        self.state = ConnectionState.AWAITING_CONNECT
        self.agent_id: str | None = None
        #: the agent has sent an agent:batch on this connection, so replies may be batched too
        self.batching = False
        self._intake: IntakePipeline | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    # -- sending ----------------------------------------------------------------------------

    async def send(self, message: AgentMessage) -> None:
        await self._ws.send_frame(encode(message), WSMsgType.TEXT)

    async def send_many(self, messages: list[AgentMessage]) -> None:
        """Send replies: one ``agent:batch`` frame per ``batch_max_messages`` when batching."""
        if not self.batching or len(messages) == 1:
            for message in messages:
                await self.send(message)
            return
        size = self._ctx.settings.batch_max_messages
        for start in range(0, len(messages), size):
            await self.send(Batch(tuple(messages[start : start + size])))

    async def _error(self, body: str, callback: str | None = None) -> None:
        await self.send(ErrorMessage(body, callback))

    # -- receiving --------------------------------------------------------------------------

    async def serve(self) -> None:
        """Read frames until the socket closes, then clean up."""
        try:
            async for frame in self._ws:
                if frame.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await self._on_frame(frame.data)
                elif frame.type is WSMsgType.ERROR:
                    log.info("websocket of agent %s failed: %s", self.agent_id, type(self._ws.exception()).__name__)
                    break
        finally:
            await self.close()

    async def _on_frame(self, data: str | bytes) -> None:
        try:
            parsed: Any = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            await self._error(f"Invalid message: not JSON ({exc.msg})")
            return
        if isinstance(parsed, dict) and parsed.get("type") == ConnectRequest.TYPE:
            await self._on_connect(parsed)
            return
        try:
            message = decode_dict(parsed, "hub")
        except UnknownMessageType as exc:
            await self._error(str(exc), exc.callback)
            return
        except ProtocolError as exc:
            await self._error(f"Invalid message: {exc}", exc.callback)
            return
        if self.state is not ConnectionState.LIVE:
            await self._error(NOT_CONNECTED, getattr(message, "callback", None))
            return
        self._ctx.registry.touch(self.agent_id)  # type: ignore[arg-type]
        await self._dispatch(message)

    async def _on_connect(self, data: dict[str, Any]) -> None:
        token, agent_id, callback = data.get("accessToken"), data.get("agentId"), data.get("callback")
        if not token or not isinstance(token, str):
            await self._error(MISSING_ACCESS_TOKEN)
            return
        if not agent_id or not isinstance(agent_id, str):
            await self._error(MISSING_AGENT_ID)
            return
        if not self._token_allows(token, agent_id) or (self.agent_id not in (None, agent_id)):
            await self._error(INVALID_ACCESS_TOKEN)
            return
        self.agent_id = agent_id
        if self.state is not ConnectionState.LIVE:
            self.state = ConnectionState.LIVE
            ctx = self._ctx
            self._intake = IntakePipeline(agent_id, self, ctx.store, ctx.writer, ctx.dispatcher)
            self._heartbeat = asyncio.create_task(self._heartbeats(), name=f"medagent-hub-heartbeat-{agent_id}")
        self._ctx.registry.register(agent_id, self)
        settings = self._ctx.settings
        features = {"batch": {"maxMessages": settings.batch_max_messages, "maxBytes": settings.batch_max_bytes}}
        await self.send(ConnectResponse(callback if isinstance(callback, str) else None, features))
        log.info("agent %s connected from %s", agent_id, self.peer)

    def _token_allows(self, token: str, agent_id: str) -> bool:
        try:
            claims = self._ctx.signer.verify(token)
            self._ctx.store.get_agent(agent_id)
        except (AuthError, NotFound):
            return False
        return claims.agent_id == agent_id

    async def _dispatch(self, message: AgentMessage) -> None:
        if isinstance(message, TransmitRequest):
            await self._intake_frame((message,), None)
        elif isinstance(message, Batch):
            self.batching = True
            requests = tuple(m for m in message.messages if isinstance(m, TransmitRequest))
            for other in message.messages:
                if not isinstance(other, TransmitRequest):
                    await self._dispatch(other)
            await self._intake_frame(requests, message.seq)
        elif isinstance(message, HeartbeatRequest):
            await self.send(HeartbeatResponse(__version__, message.callback))
        elif isinstance(message, HeartbeatResponse):
            self._ctx.registry.touch(self.agent_id, message.version)  # type: ignore[arg-type]
        elif isinstance(message, _REPLY_TYPES):
            self._settle(message)
        elif isinstance(message, BatchAck):
            pass  # the hub never asks for acks of its own batches
        else:
            await self._error(f"Unexpected message type for the hub: {message.TYPE}", getattr(message, "callback", None))

    async def _intake_frame(self, requests: tuple[TransmitRequest, ...], seq: int | None) -> None:
        assert self._intake is not None
        await self._intake.submit(requests, seq)

    def _settle(self, message: AgentMessage) -> None:
        callback = getattr(message, "callback", None)
        if callback is not None and self._ctx.pending.resolve(callback, message):
            return
        if isinstance(message, ErrorMessage):
            log.warning("agent %s reported an error (%d chars)%s", self.agent_id, len(message.body),
                        f" for callback {callback}" if callback else "")
        else:
            log.info("agent %s: %s for an unknown or expired callback dropped", self.agent_id, message.TYPE)

    async def _heartbeats(self) -> None:
        interval = self._ctx.settings.heartbeat_interval_s
        while self.state is ConnectionState.LIVE:
            await asyncio.sleep(interval)
            try:
                await self.send(HeartbeatRequest())
            except (ConnectionError, RuntimeError):
                return

    # -- closing ----------------------------------------------------------------------------

    async def close(self) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        self.state = ConnectionState.CLOSED
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self.agent_id is not None:
            self._ctx.registry.unregister(self.agent_id, self)
            log.info("agent %s disconnected", self.agent_id)
        if self._intake is not None:
            await self._intake.close()
        if not self._ws.closed:
            await self._ws.close()


async def handle_agent_websocket(request: web.Request) -> web.StreamResponse:
    """aiohttp handler of ``GET /ws/agent``."""
    ctx = request.app[CTX_KEY]
    settings = ctx.settings
    ws = web.WebSocketResponse(
        max_msg_size=settings.max_frame_bytes, compress=False, heartbeat=max(30.0, 3 * settings.heartbeat_interval_s)
    )
    await ws.prepare(request)
    connection = AgentConnection(ctx, ws, request.remote or "unknown")
    request.app[CONNECTIONS_KEY].add(connection)
    try:
        await connection.serve()
    finally:
        request.app[CONNECTIONS_KEY].discard(connection)
    return ws
