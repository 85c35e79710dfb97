"""The hub side of one agent websocket, ``/ws/agent``: the I/O skin around the protocol core.

Theory of operation
-------------------
The protocol state — Medplum's connect errors, frames refused before the handshake, heartbeat
answers, batch sequence and cumulative-ack bookkeeping, error replies to bad frames — is
:class:`~medagent.proto.agent_session.HubSession` (medplum-protocol.md §1.2, §1.3, §2). This
module moves frames between it and aiohttp and does what needs the hub's state:

* :class:`~medagent.proto.agent_session.ConnectRequested`: the token is verified like Medplum's
  ``handleConnect`` (a forged, expired or foreign token, or an unknown agent ->
  ``agent:error "Invalid access token"``, no callback, socket left open). On success the
  connection becomes the agent's current one in the registry, an intake pipeline starts, and the
  core answers ``agent:connect:response`` with ``features.batch = {maxMessages, maxBytes}``;
* the connection is also announced on the hub's bus (:meth:`AgentBus.attach`), so that an
  operation called on any hub process reaches it and ``$status`` sees it; every frame notes the
  heartbeat in memory (:meth:`AgentBus.touch`), the socket's close detaches it;
* revocation: the token generation the connection was accepted with is compared with the
  store's on every heartbeat answer; once the agent's tokens are revoked (by the API, the
  dashboard or ``medagent hub revoke-tokens`` in another process) the socket is closed
  (1008 policy violation) within one heartbeat interval, and the agent must log in again;
* transmit requests (alone or in an ``agent:batch``) go to the
  :class:`~medagent.hub.intake.IntakePipeline`, whose ``agent:batch:ack`` passes through the core
  (never for a seq not received, never twice);
* replies and ``agent:error`` frames that carry a callback resolve the HTTP operation waiting for
  it; heartbeat responses record the agent's version for ``$status``;
* a ticker drives the core's deadlines: ``agent:heartbeat:request`` every
  ``heartbeat_interval_s`` while live. aiohttp's websocket pings detect a dead TCP connection.

Invariants: the hub never closes a socket because of a bad frame; a connection registers only
after a valid handshake and unregisters only itself; frames leave in the order the core queued
them; nothing logs frame contents.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable

from aiohttp import WSCloseCode, WSMsgType, web

from medagent import __version__
from medagent.cloud.messages import AgentMessage, Batch, BatchAck, ErrorMessage
from medagent.hub.auth import AuthError
from medagent.hub.bus import Hold
from medagent.hub.context import CONNECTIONS_KEY, CTX_KEY, HubContext
from medagent.hub.intake import IntakePipeline
from medagent.hub.store import NotFound
from medagent.proto import agent_session as core
from medagent.proto.agent_session import (
    INVALID_ACCESS_TOKEN,
    MISSING_ACCESS_TOKEN,
    MISSING_AGENT_ID,
    NOT_CONNECTED,
    HubSession,
    SessionState,
)

__all__ = [
    "INVALID_ACCESS_TOKEN",
    "MISSING_ACCESS_TOKEN",
    "MISSING_AGENT_ID",
    "NOT_CONNECTED",
    "AgentConnection",
    "ConnectionState",
    "handle_agent_websocket",
]

log = logging.getLogger(__name__)

#: the connection's protocol state (the core's; kept under its old name)
ConnectionState = SessionState

#: How long a batch ack with nothing to carry it waits for the connection's next write (a reply,
#: the next ack) to ride in: at one lock-step sender in original mode the ack of message n then
#: leaves with the reply to message n+1, one write and one wake-up of the agent instead of two.
#: An ack only lets the agent forget messages it keeps meanwhile; nothing waits for it.
ACK_LINGER_S = 0.002

_TEXT_FIN = 0x81  # FIN + opcode 1 (text), RFC 6455 §5.2
_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack


def _frame_header(size: int) -> bytes:
    """The header of one unmasked (server-to-client) FIN text frame of ``size`` payload bytes."""
    if size < 126:
        return bytes((_TEXT_FIN, size))
    if size < 65536:
        return _HEADER_16(_TEXT_FIN, 126, size)
    return _HEADER_64(_TEXT_FIN, 127, size)


def _framed(frames: list[bytes]) -> bytes:
    """``frames`` as websocket frames, back to back, for one transport write: a batch ack and the
    replies after it reach the agent in one segment (it wakes and reads once), and the flush costs
    one ``send`` instead of one per frame plus two ``setsockopt`` (the TCP_CORK this replaced)."""
    if len(frames) == 1:
        return _frame_header(len(frames[0])) + frames[0]
    parts: list[bytes] = []
    for frame in frames:
        parts.append(_frame_header(len(frame)))
        parts.append(frame)
    return b"".join(parts)


class AgentConnection:
    """One agent websocket: a :class:`HubSession` plus the hub state it needs."""

    def __init__(self, ctx: HubContext, ws: web.WebSocketResponse, peer: str, transport: asyncio.Transport,
                 drain: Callable[[], Awaitable[None]]) -> None:
        self._ctx = ctx
        self._ws = ws
        self._transport = transport  # the socket's, written directly (see _flush)
        self._drain = drain  # waits while the transport's buffer is over its high-water mark
        self.peer = peer
        self._core = HubSession(version=__version__, now=time.monotonic(),
                                heartbeat_s=ctx.settings.heartbeat_interval_s)
        self._intake: IntakePipeline | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False
        self._hold: Hold | None = None
        self._generation: int | None = None  # the token generation the connection was accepted with
        self._ack_due: int | None = None  # a batch ack waiting to ride in the next write (ACK_LINGER_S)
        self._ack_timer: asyncio.TimerHandle | None = None

    @property
    def state(self) -> SessionState:
        return self._core.state

    @property
    def agent_id(self) -> str | None:
        return self._core.agent_id

    @property
    def batching(self) -> bool:
        """The agent has sent an agent:batch on this connection, so replies may be batched too."""
        return self._core.batching

    # -- sending ----------------------------------------------------------------------------

    async def send(self, message: AgentMessage) -> None:
        """Send one message; raises ConnectionError once the connection is closed."""
        if type(message) is BatchAck:
            self._core.acknowledge(message.seq)
        else:
            self._check_open()
            self._core.send(message)
        await self._flush()

    async def send_many(self, messages: list[AgentMessage]) -> None:
        """Send replies: one ``agent:batch`` frame per ``batch_max_messages`` when batching.

        A leading :class:`BatchAck` is queued first, so an ack and the replies it precedes
        leave in one flush (one TCP segment, one wake-up of the agent; see :meth:`_flush`). An
        ack alone waits up to :data:`ACK_LINGER_S` for the connection's next write instead."""
        if len(messages) == 1 and type(ack := messages[0]) is BatchAck:
            self._defer_ack(ack.seq)
            return
        self._queue(messages)
        await self._flush()

    def send_now(self, messages: list[AgentMessage]) -> None:
        """Write ``messages`` in this call, without waiting for the transport to drain (the next
        awaited send waits for it): for replies that leave in the middle of a store round, which
        cannot yield (see medagent.hub.intake). Raises ConnectionError once the connection is closed."""
        self._queue(messages)
        self._write_queued()

    def _queue(self, messages: list[AgentMessage]) -> None:
        session = self._core
        if messages and isinstance(ack := messages[0], BatchAck):
            session.acknowledge(ack.seq)
            messages = messages[1:]
        if messages:
            self._check_open()
        if not session.batching or len(messages) == 1:
            for message in messages:
                session.send(message)
        else:
            size = self._ctx.settings.batch_max_messages
            for start in range(0, len(messages), size):
                session.send(Batch(tuple(messages[start : start + size])))

    def _check_open(self) -> None:
        if self._core.closed:
            raise ConnectionError(f"the websocket of agent {self.agent_id} is closed")

    async def _flush(self) -> None:
        """Write what the core queued, in one transport write.

        The frames are written here rather than through aiohttp's ``send_frame`` (one write per
        frame): with no ``await`` between :meth:`HubSession.data_to_send` and the write, frames
        leave in the core's order without a lock, and never interleave with aiohttp's own control
        frames (pongs, close), which it also writes whole. aiohttp's flow control is kept: while
        the transport's buffer is over its high-water mark the caller waits for it to drain."""
        if self._write_queued():
            await self._drain()

    def _defer_ack(self, seq: int) -> None:
        self._ack_due = seq if self._ack_due is None else max(seq, self._ack_due)
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_LINGER_S, self._write_due_ack)

    def _write_due_ack(self) -> None:
        """The linger ended with nothing written meanwhile: the ack goes alone."""
        self._ack_timer = None
        try:
            self._write_queued()
        except ConnectionError:
            pass  # closed meanwhile: the agent resends what it kept, the hub recognises it

    def _write_queued(self) -> bool:
        """Write what the core queued, and the ack waiting for a write; True when the
        transport's buffer is not empty."""
        if self._ack_due is not None:
            self._core.acknowledge(self._ack_due)
            self._ack_due = None
            if self._ack_timer is not None:
                self._ack_timer.cancel()
                self._ack_timer = None
        if not self._core.has_data():
            return False  # most frames (transmits waiting for storage) need no answer yet
        transport = self._transport
        if self._ws.closed or transport.is_closing():
            self._core.data_to_send()  # a closed socket sends nothing more
            raise ConnectionResetError(f"the websocket of agent {self.agent_id} is closing")
        transport.write(_framed(self._core.data_to_send()))
        return bool(transport.get_write_buffer_size())

    # -- receiving --------------------------------------------------------------------------

    async def serve(self) -> None:
        """Read frames until the socket closes, then clean up."""
        self._ticker = asyncio.create_task(self._tick_loop(), name=f"medagent-hub-ticker-{self.peer}")
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
        session = self._core
        events = session.receive_frame(data)
        if session.live:
            self._ctx.bus.touch(session.agent_id)  # type: ignore[arg-type]
        for event in events:
            kind = type(event)
            if kind is core.TransmitsReceived:
                assert self._intake is not None
                await self._intake.submit(event.requests, event.seq)  # type: ignore[union-attr]
            elif kind is core.Reply:
                self._settle(event.message)  # type: ignore[union-attr]
            elif kind is core.HeartbeatAnswered:
                self._ctx.bus.touch(session.agent_id, event.version)  # type: ignore
                if await self._revoked():
                    return
            elif kind is core.ConnectRequested:
                await self._on_connect(event)  # type: ignore[arg-type]
            elif kind is core.Violation:
                log.info("agent %s (%s): %s (%d bytes), answered with agent:error", self.agent_id, self.peer,
                         event.problem, event.size)  # type: ignore[union-attr]
        if session.has_data():  # most frames (transmits waiting for storage) need no answer yet
            await self._flush()

    async def _on_connect(self, request: core.ConnectRequested) -> None:
        agent_id = request.agent_id
        generation = await self._token_generation(request.access_token, agent_id)
        if generation is None:
            self._core.refuse(INVALID_ACCESS_TOKEN)
            return
        self._generation = generation
        ctx = self._ctx
        if self._intake is None:
            self._intake = IntakePipeline(agent_id, self, ctx.store, ctx.writer, ctx.dispatcher)
        ctx.registry.register(agent_id, self)
        if self._hold is None:
            self._hold = await ctx.bus.attach(agent_id)
        settings = self._ctx.settings
        features = {"batch": {"maxMessages": settings.batch_max_messages, "maxBytes": settings.batch_max_bytes}}
        self._core.accept(agent_id, features, request.callback)
        log.info("agent %s connected from %s", agent_id, self.peer)

    async def _token_generation(self, token: str, agent_id: str) -> int | None:
        """The token's generation when it is current and the agent's, else None."""
        try:
            claims = await self._ctx.signer.verify_current(token)
            await self._ctx.store.get_agent(agent_id)
        except (AuthError, NotFound):
            return None
        return claims.generation if claims.agent_id == agent_id else None

    async def _revoked(self) -> bool:
        """Close the socket if the agent's tokens were revoked since it connected (one
        primary-key read per heartbeat); True when it was closed."""
        agent_id = self.agent_id
        if agent_id is None or self._generation is None:
            return False
        current = await self._ctx.store.token_generation(agent_id)
        if current == self._generation:
            return False
        log.info("agent %s: its tokens were revoked; closing its websocket", agent_id)
        await self.close(WSCloseCode.POLICY_VIOLATION, b"access token revoked")
        return True

    def _settle(self, message: AgentMessage) -> None:
        callback = getattr(message, "callback", None)
        if callback is not None and self._ctx.pending.resolve(callback, message):
            return
        if isinstance(message, ErrorMessage):
            log.warning("agent %s reported an error (%d chars)%s", self.agent_id, len(message.body),
                        f" for callback {callback}" if callback else "")
        else:
            log.info("agent %s: %s for an unknown or expired callback dropped", self.agent_id, message.TYPE)

    async def _tick_loop(self) -> None:
        session = self._core
        while not session.closed:
            delay = session.next_deadline() - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            session.tick(time.monotonic())  # no dead-link limit on the hub: aiohttp pings do that
            try:
                await self._flush()
            except (ConnectionError, RuntimeError):
                return

    # -- closing ----------------------------------------------------------------------------

    async def close(self, code: int = WSCloseCode.OK, reason: bytes = b"") -> None:
        if self._closing:
            return
        self._closing = True
        if self._ack_due is not None:  # what is stored is acked before the close
            try:
                self._write_queued()  # (cancels the linger)
            except ConnectionError:
                pass
        self._core.close()
        if self._ticker is not None:
            self._ticker.cancel()
        if self.agent_id is not None:
            self._ctx.registry.unregister(self.agent_id, self)
            if self._hold is not None:
                await self._ctx.bus.detach(self._hold)
            log.info("agent %s disconnected", self.agent_id)
        if self._intake is not None:
            await self._intake.close()
        if not self._ws.closed:
            await self._ws.close(code=code, message=reason)


async def handle_agent_websocket(request: web.Request) -> web.StreamResponse:
    """aiohttp handler of ``GET /ws/agent``."""
    ctx = request.app[CTX_KEY]
    settings = ctx.settings
    ws = web.WebSocketResponse(
        max_msg_size=settings.max_frame_bytes, compress=False, heartbeat=max(30.0, 3 * settings.heartbeat_interval_s)
    )
    await ws.prepare(request)
    transport = request.transport
    if transport is None:  # the agent left during the handshake
        return ws
    connection = AgentConnection(ctx, ws, request.remote or "unknown", transport, request.writer.drain)
    request.app[CONNECTIONS_KEY].add(connection)
    try:
        await connection.serve()
    finally:
        request.app[CONNECTIONS_KEY].discard(connection)
    return ws
