"""The agent's websocket link to the hub: auth, connect, heartbeats, reconnect, batching.

Theory of operation
-------------------
One supervisor task (:meth:`AgentLink.start`) loops forever until :meth:`AgentLink.close`:

1. get an access token (:class:`~medagent.cloud.auth.TokenClient`, OAuth2 client credentials);
2. open ``ws(s)://<host>/ws/agent`` (medplum-protocol.md §1.2: scheme https→wss, http→ws, path
   replaced) and send ``agent:connect:request {accessToken, agentId}``;
3. run one *session* — a reader, a writer and a heartbeat ticker task — until any of them ends;
4. back off (jittered exponential, ``reconnect_min_s`` .. ``reconnect_max_s``) and start over.
   The backoff resets after a session that stayed live for at least one heartbeat period.

A session is **live** only after ``agent:connect:response`` (or the legacy ``connected``). An
``agent:error`` without a callback before that is the hub refusing the connect; the session ends
at once. ``"Invalid access token"`` at any time (for the connect or for a transmit) also ends the
session and marks the token for renewal: the next attempt connects with a new token, and the
runtime re-sends what was unconfirmed (``on_down``) instead of losing it to a stale token.

An ``agent:error`` carrying the callback of a transmit is also reported to the handler's optional
``on_transmit_error(callback, reason)`` (before any confirmation), so the runtime can record that
the hub refused that message.

Heartbeats (§1.3): every ``heartbeat_s`` the ticker sends ``agent:heartbeat:request`` while live;
if ``max_missed_heartbeats`` periods pass with no frame at all from the hub, the link is declared
dead and the socket aborted (this catches a half-open TCP connection that the kernel does not
notice). Any received frame counts as proof of life, not only heartbeat responses — under a long
burst the hub's heartbeat reply queues behind thousands of transmit responses, and those prove the
link as well. A socket that is not live after 2 ticks is reconnected (a lost connect request).
Server heartbeat requests are answered with ``{version}``. websockets' own keepalive pings are
disabled: the protocol heartbeats already detect a dead link, are what a Medplum server expects,
and one mechanism means one reconnect policy.

Sending. :meth:`AgentLink.send_transmit` is the hot path: it appends the message to the session's
list and sets the writer's event — no task, future or encoding per message. The single writer task
wakes once per loop iteration, takes everything queued and encodes it with orjson:

* batch mode (the hub advertised ``features.batch`` and ``use_batching``): already-encoded message
  bytes are joined into ``agent:batch`` frames of at most ``max_batch_messages`` and
  ``max_batch_bytes`` (the smaller of ours and the hub's; frames are also cut near
  :data:`BATCH_FRAME_TARGET_BYTES`, which is cheaper than one huge frame); the hub confirms
  cumulatively with ``agent:batch:ack {seq}``.
* plain mode (a Medplum server): one ``agent:transmit:request`` frame per message, confirmed by
  the ``agent:transmit:response`` or ``agent:error`` with the same callback. ``agent:batch`` is
  never sent to a hub that did not advertise it.

Messages handed over in one loop iteration leave together; frames written in one go are framed
inside one websockets send context (see :func:`_write_text_frames`), so a burst costs few awaits
and few socket writes. A message orjson cannot encode (a lone surrogate in a str) is sent with
U+FFFD in place of the bad characters rather than stalling the link.

Proxies: ``HTTPS_PROXY``/``ALL_PROXY``/``NO_PROXY`` from the environment are honoured for both
the token requests (aiohttp ``trust_env``) and the websocket (websockets' proxy support), as a
hospital network often requires.

Every transmit carries the current ``accessToken`` (the Medplum agent overwrites it at send time,
§1.1); the token is renewed in the background before it expires. Control frames (heartbeats,
replies) are written before queued transmits. Frames are JSON sent as websocket TEXT frames.

Receiving. Each frame is decoded with ``messages.decode(frame, "agent")``; ``agent:batch`` frames
are unpacked. Following the Medplum agent (§2 agent rules): a malformed frame is answered with
``agent:error "WebSocket error on incoming message: ..."``, an unknown type with
``agent:error "Unknown message type: <t>"`` (with the callback when known), and a hub
``agent:error`` that nobody waits for is only logged. Hub requests (outbound transmit,
reloadconfig, logs, stats, upgrade) run :meth:`LinkHandler.on_request` in a task; the reply gets
the request's callback.

Invariants
----------
* ``send_transmit`` returns True only while live; after it returns True the message is either
  confirmed through ``on_confirmed`` or the session ends and ``on_down`` is called, after which no
  confirmation for that session is ever delivered.
* ``on_live`` and ``on_down`` alternate, starting with ``on_live``.
* Batch ``seq`` restarts at 1 on every connection; confirmations are delivered in send order.
* Message bodies never appear in logs: only types, sizes, counts and callbacks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import random
import re
import ssl
import time
import types
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import medagent
from medagent.cloud import messages as m
from medagent.cloud.auth import AuthError, HubUnavailableError, TokenClient, build_ssl_context

__all__ = [
    "AgentLink",
    "Backoff",
    "LinkConfigError",
    "LinkHandler",
    "LinkSettings",
    "LinkState",
    "websocket_url",
]

log = logging.getLogger(__name__)

#: Largest frame accepted from the hub.
MAX_FRAME_BYTES = 64 * 1024 * 1024
#: Ticks without ``agent:connect:response`` before the socket is replaced (Medplum: 2).
MAX_NOT_LIVE_TICKS = 2
#: The Medplum server's connect error for a bad or expired token.
INVALID_TOKEN_ERROR = "Invalid access token"
#: agent:batch frames are cut at about this size even when the limits allow more. Frames below
#: glibc's 128 KiB mmap threshold reuse heap memory; 350 KiB frames cost ~4 µs/message more in
#: page faults and kernel time on the sender (measured on loopback, 625-byte HL7 messages).
BATCH_FRAME_TARGET_BYTES = 96 * 1024
#: Room for ``{"type":"agent:batch","seq":N,"messages":[...]}`` around the joined messages.
_BATCH_FRAME_OVERHEAD = 64
#: How long a graceful websocket close may take before the socket is aborted.
_CLOSE_TIMEOUT_S = 2.0
#: Error bodies from the hub are logged up to this length (they are error texts, not messages).
_LOGGED_ERROR_CHARS = 200

#: Frames framed per write when coalescing (bounds the write buffer to a few MiB).
_COALESCE_FRAMES = 256
_CAN_COALESCE = hasattr(ClientConnection, "send_context")

_CLOSED_BY_AGENT = "link closed by the agent"
_HEARTBEAT_REQUEST_FRAME = m.encode(m.HeartbeatRequest())
_DUPLICATE_OF_KEY = m.JSON_NAMES.get("duplicate_of", "duplicate_of")


class LinkState(enum.IntEnum):
    """Where the supervisor is; logged on every change."""

    STOPPED = 0
    AUTHENTICATING = 1
    CONNECTING = 2  # socket opening or open, agent:connect:response not yet received
    LIVE = 3
    BACKOFF = 4


class LinkConfigError(ValueError):
    """The link settings cannot work (bad URL scheme, unreadable CA file, bad limits)."""


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """Everything the link needs; the defaults follow the Medplum agent and DESIGN.md."""

    base_url: str
    client_id: str
    client_secret: str
    agent_id: str
    ca_file: str | None = None
    verify_tls: bool = True
    heartbeat_s: float = 10.0
    max_missed_heartbeats: int = 2  # reconnect after that many periods without hub traffic
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 30.0
    use_batching: bool = True
    max_batch_messages: int = 1000
    max_batch_bytes: int = 4 * 1024 * 1024
    request_timeout_s: float = 10.0
    token_refresh_margin_s: float = 60.0


class LinkHandler(Protocol):
    """What the link reports to (implemented by the agent runtime).

    A handler may also define ``on_transmit_error(callback: str, reason: str) -> None``: it is
    called for every hub ``agent:error`` that carries a transmit's callback, before that message
    is confirmed (plain mode) or acked (batch mode), so the runtime can mark it refused.
    """

    def on_live(self, features: Mapping[str, Any]) -> None:
        """``agent:connect:response`` received; ``features`` is ``{}`` for a plain Medplum hub."""

    def on_down(self, reason: str) -> None:
        """The live link is lost; every unconfirmed transmit of it stays unconfirmed forever."""

    def on_confirmed(self, callbacks: Sequence[str]) -> None:
        """The hub confirmed these transmit requests (by callback)."""

    def on_transmit_response(self, message: m.TransmitResponse) -> None:
        """A bot's reply to an inbound message."""

    async def on_request(self, message: m.AgentMessage) -> m.AgentMessage | None:
        """A hub request; the returned message is sent with the request's callback."""


def websocket_url(base_url: str) -> str:
    """``https://host[:port]/any/path`` -> ``wss://host[:port]/ws/agent`` (http -> ws)."""
    parts = urlsplit(base_url)
    scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise LinkConfigError(f"hub base URL {base_url!r} must be http(s)://host[:port]/")
    netloc = parts.netloc.rsplit("@", 1)[-1]  # never put credentials in the websocket URL
    return urlunsplit((scheme, netloc, "/ws/agent", "", ""))


class Backoff:
    """Jittered exponential delays: ``min_s * 2**n`` capped at ``max_s``, each drawn in [d/2, d]."""

    def __init__(
        self, min_s: float, max_s: float, rng: Callable[[], float] = random.random
    ) -> None:
        if not 0 < min_s <= max_s:
            raise LinkConfigError(f"reconnect delays need 0 < min ({min_s}) <= max ({max_s})")
        self._min_s = min_s
        self._max_s = max_s
        self._rng = rng
        self.attempts = 0

    def next_delay(self) -> float:
        ceiling = min(self._max_s, self._min_s * 2.0 ** min(self.attempts, 64))
        self.attempts += 1
        return max(self._min_s, ceiling * (0.5 + 0.5 * self._rng()))

    def reset(self) -> None:
        self.attempts = 0


class _Session:
    """Per-connection state; discarded when the connection ends."""

    __slots__ = (
        "ws",
        "live",
        "live_since",
        "features",
        "batch_limits",
        "frames",
        "transmits",
        "wake",
        "next_seq",
        "unacked_batches",
        "unconfirmed",
        "outstanding_heartbeats",
        "not_live_ticks",
        "heartbeat_sent_at",
        "dead",
    )

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.live = False
        self.live_since = 0.0
        self.features: Mapping[str, Any] = types.MappingProxyType({})
        #: (max messages, max bytes) per agent:batch frame, or None in plain mode.
        self.batch_limits: tuple[int, int] | None = None
        self.frames: list[bytes] = []  # encoded control frames, sent first
        self.transmits: list[m.TransmitRequest] = []  # handed over by send_transmit
        self.wake = asyncio.Event()
        self.next_seq = 1
        self.unacked_batches: deque[tuple[int, list[str]]] = deque()
        self.unconfirmed: set[str] = set()  # plain mode: callbacks sent, not yet answered
        self.outstanding_heartbeats = 0
        self.not_live_ticks = 0
        self.heartbeat_sent_at = 0.0
        self.dead = False  # heartbeat timeout: abort instead of a closing handshake

    def unconfirmed_count(self) -> int:
        return len(self.unconfirmed) + sum(len(cbs) for _, cbs in self.unacked_batches)


def _transmit_dict(
    message: m.TransmitRequest, token: str | None, extensions: bool
) -> dict[str, Any]:
    """The JSON object of an agent->hub transmit request (same keys as ``messages.to_dict``).

    ``accessToken`` is overwritten with the current token, as the Medplum agent does; medagent's
    ``duplicateOf`` and ``noReply`` extensions are only kept when the hub advertised batching.
    """
    data: dict[str, Any] = {
        "type": "agent:transmit:request",
        "remote": message.remote,
        "contentType": message.content_type,
        "body": message.body,
        "callback": message.callback,
    }
    if message.channel is not None:
        data["channel"] = message.channel
    if token is not None:
        data["accessToken"] = token
    elif message.access_token is not None:
        data["accessToken"] = message.access_token
    if message.return_ack is not None:
        data["returnAck"] = message.return_ack
    if extensions and message.duplicate_of is not None:
        data[_DUPLICATE_OF_KEY] = message.duplicate_of
    if extensions and message.no_reply:
        data["noReply"] = True
    return data


def _batch_limits(features: Mapping[str, Any], settings: LinkSettings) -> tuple[int, int] | None:
    """Per-frame limits for agent:batch, or None when batching must not be used."""
    advertised = features.get("batch")
    if not settings.use_batching or not isinstance(advertised, Mapping):
        return None

    def limit(key: str, ours: int) -> int:
        theirs = advertised.get(key)
        ok = isinstance(theirs, int) and not isinstance(theirs, bool) and theirs > 0
        return min(ours, theirs) if ok else ours

    return (
        limit("maxMessages", settings.max_batch_messages),
        limit("maxBytes", settings.max_batch_bytes),
    )


class AgentLink:
    """The agent side of the agent<->hub websocket (see the module docstring)."""

    def __init__(
        self, settings: LinkSettings, handler: LinkHandler, *, version: str = medagent.__version__
    ) -> None:
        self._settings = settings
        self._handler = handler
        self._version = version
        self._url = websocket_url(settings.base_url)
        self._ssl = self._tls_context(settings) if self._url.startswith("wss:") else None
        self._tokens = TokenClient(
            settings.base_url,
            settings.client_id,
            settings.client_secret,
            ssl=self._ssl if self._ssl is not None else True,
            refresh_margin_s=settings.token_refresh_margin_s,
            timeout_s=settings.request_timeout_s,
        )
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        if settings.max_batch_messages < 1 or settings.max_batch_bytes < 1024:
            raise LinkConfigError("max_batch_messages must be >= 1 and max_batch_bytes >= 1024")
        if settings.heartbeat_s <= 0 or settings.max_missed_heartbeats < 1:
            raise LinkConfigError("heartbeat_s must be > 0 and max_missed_heartbeats >= 1")
        self._state = LinkState.STOPPED
        self._session: _Session | None = None
        self._runner: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._refresh_task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[m.AgentMessage]] = {}
        self._last_error: str | None = None
        self._on_transmit_error: Callable[[str, str], None] | None = getattr(
            handler, "on_transmit_error", None
        )
        self._dispatch: dict[type[m.AgentMessage], Callable[[_Session, Any], str | None]] = {
            m.TransmitResponse: self._on_transmit_response,
            m.BatchAck: self._on_batch_ack,
            m.ErrorMessage: self._on_error,
            m.HeartbeatRequest: self._on_heartbeat_request,
            m.HeartbeatResponse: self._on_heartbeat_response,
            m.ConnectResponse: self._on_connect_response,
            m.TransmitRequest: self._on_hub_request,
            m.ReloadConfigRequest: self._on_hub_request,
            m.UpgradeRequest: self._on_hub_request,
            m.LogsRequest: self._on_hub_request,
            m.StatsRequest: self._on_hub_request,
        }
        # counters for stats()
        self._connects = 0
        self._frames_sent = 0
        self._frames_received = 0
        self._messages_received = 0
        self._transmits_sent = 0
        self._batches_sent = 0
        self._confirmed = 0
        self._last_ping_ms: float | None = None

    @staticmethod
    def _tls_context(settings: LinkSettings) -> ssl.SSLContext:
        try:
            return build_ssl_context(settings.ca_file, settings.verify_tls)
        except (OSError, ssl.SSLError) as exc:
            raise LinkConfigError(f"ca_file {settings.ca_file!r} cannot be used: {exc}") from None

    # -- public API ---------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        session = self._session
        return session is not None and session.live

    @property
    def features(self) -> Mapping[str, Any]:
        """What the hub advertised in its connect response (``{}`` for Medplum or when not live)."""
        session = self._session
        return session.features if session is not None else types.MappingProxyType({})

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def last_error(self) -> str | None:
        """The most recent reason the link could not come up or went down (None once live)."""
        return self._last_error

    @property
    def tokens(self) -> TokenClient:
        return self._tokens

    async def start(self) -> None:
        """Start the supervisor in the background; it runs until :meth:`close`."""
        if self._runner is not None:
            raise RuntimeError("AgentLink.start() was already called")
        log.info("link to %s as agent %s (medagent %s)", self._url, self._settings.agent_id,
                 self._version)
        self._runner = asyncio.get_running_loop().create_task(self._supervise(),
                                                              name="medagent-link")

    async def close(self) -> None:
        """Stop reconnecting, close the socket (``on_down`` if it was live), release resources."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._tokens.close()
        self._set_state(LinkState.STOPPED)

    def send_transmit(self, message: m.TransmitRequest) -> bool:
        """Queue a device message for the hub; False when not live (keep it, re-send later)."""
        session = self._session
        if session is None or not session.live:
            return False
        if message.callback is None:
            raise ValueError("send_transmit needs a message with a callback (its confirmation id)")
        session.transmits.append(message)
        session.wake.set()
        return True

    def send(self, message: m.AgentMessage) -> None:
        """Fire-and-forget any other frame; dropped (and logged at debug) when not connected."""
        session = self._session
        if session is None:
            log.debug("not connected: %s dropped", message.TYPE)
            return
        self._enqueue(session, self._encode(message))

    async def request(
        self, message: m.AgentMessage, timeout: float | None = None
    ) -> m.AgentMessage:
        """Send ``message`` and return the hub's frame with the same callback.

        A callback is generated when missing. Raises ``TimeoutError`` after ``timeout`` (default
        ``request_timeout_s``) and ``ConnectionError`` when the link is not live or drops first.
        """
        session = self._session
        if session is None or not session.live:
            raise ConnectionError("the link to the hub is not live")
        callback = _callback_of(message)
        if callback is None:
            new_callback = m.new_callback(self._settings.agent_id)
            try:
                message = dataclasses.replace(message, callback=new_callback)  # type: ignore
            except TypeError:
                raise ValueError(f"{message.TYPE} has no callback field") from None
            callback = message.callback  # type: ignore[attr-defined]
        if callback in self._pending:
            raise ValueError(f"a request with callback {callback} is already waiting")
        future: asyncio.Future[m.AgentMessage] = asyncio.get_running_loop().create_future()
        self._pending[callback] = future
        limit = self._settings.request_timeout_s if timeout is None else timeout
        try:
            self._enqueue(session, self._encode(message))
            async with asyncio.timeout(limit):
                return await future
        except TimeoutError:
            raise TimeoutError(
                f"no reply to {message.TYPE} {callback} within {limit:g} s"
            ) from None
        finally:
            self._pending.pop(callback, None)

    async def fetch_json(self, path: str) -> dict[str, Any]:
        """Authenticated REST ``GET`` on the hub (e.g. ``/fhir/R4/Agent/<id>``)."""
        return await self._tokens.fetch_json(path)

    def stats(self) -> dict[str, Any]:
        """Counters and state for status pages and ``agent:stats``."""
        session = self._session
        return {
            "state": self._state.name.lower(),
            "live": self.live,
            "url": self._url,
            "batching": session is not None and session.batch_limits is not None,
            "connects": self._connects,
            "reconnects": max(0, self._connects - 1),
            "frames_sent": self._frames_sent,
            "frames_received": self._frames_received,
            "messages_sent": self._transmits_sent,
            "messages_received": self._messages_received,
            "batches_sent": self._batches_sent,
            "confirmed": self._confirmed,
            "unconfirmed": session.unconfirmed_count() if session is not None else 0,
            "backlog": len(session.transmits) + len(session.frames) if session is not None else 0,
            "outstanding_heartbeats": session.outstanding_heartbeats if session is not None else 0,
            "last_ping_ms": self._last_ping_ms,
            "tokens_fetched": self._tokens.tokens_fetched,
            "last_error": self._last_error,
        }

    # -- supervisor ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            while True:
                reason = await self._attempt()
                if reason is not None:
                    self._last_error = reason
                delay = self._backoff.next_delay()
                self._set_state(LinkState.BACKOFF)
                log.info("reconnecting in %.2f s", delay)
                await asyncio.sleep(delay)
        finally:
            self._fail_pending("the link to the hub was closed")

    async def _attempt(self) -> str | None:
        """One token + connect + session cycle; returns why it ended."""
        self._set_state(LinkState.AUTHENTICATING)
        try:
            token = await self._tokens.get_token()
        except AuthError as exc:
            log.error("authentication failed: %s", exc)
            return str(exc)
        except HubUnavailableError as exc:
            log.warning("token endpoint unavailable: %s", exc)
            return str(exc)
        self._set_state(LinkState.CONNECTING)
        try:
            ws = await connect(
                self._url,
                ssl=self._ssl,
                # deflate costs more CPU than loopback/LAN bandwidth is worth; Medplum's server
                # (Node ws) does not enable it either
                compression=None,
                ping_interval=None,  # protocol heartbeats do this (module docstring)
                open_timeout=self._settings.request_timeout_s,
                close_timeout=_CLOSE_TIMEOUT_S,
                max_size=MAX_FRAME_BYTES,
                write_limit=2**20,
                user_agent_header=f"medagent/{self._version}",
            )
        except Exception as exc:  # OSError, TLS, InvalidHandshake, TimeoutError, proxy errors...
            reason = f"cannot open {self._url}: {type(exc).__name__}: {exc}"
            log.warning("%s", reason)
            return reason
        try:
            return await self._run_session(ws, token)
        except Exception as exc:  # a bug must not stop the supervisor for good
            log.error("link session failed: %s", type(exc).__name__, exc_info=_debugging())
            return f"internal error: {type(exc).__name__}"

    async def _run_session(self, ws: ClientConnection, token: str) -> str:
        session = _Session(ws)
        self._session = session
        self._connects += 1
        reason = _CLOSED_BY_AGENT
        try:
            connect_request = m.ConnectRequest(access_token=token, agent_id=self._settings.agent_id)
            await ws.send(m.encode(connect_request), text=True)
            self._frames_sent += 1
            tasks = [
                asyncio.create_task(self._read_loop(session), name="medagent-link-reader"),
                asyncio.create_task(self._write_loop(session), name="medagent-link-writer"),
                asyncio.create_task(self._heartbeat_loop(session), name="medagent-link-heartbeat"),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            reason = _session_end_reason(done)
        except ConnectionClosed as exc:
            reason = f"connection closed: {exc}"
        finally:
            self._session = None
            await self._close_socket(session)
            self._end_session(session, reason)
        return reason

    async def _close_socket(self, session: _Session) -> None:
        ws = session.ws
        if session.dead:
            ws.transport.abort()
            return
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S + 0.5):
                await ws.close()
        except BaseException:  # noqa: BLE001 - cancellation or a timeout here: just drop the socket
            ws.transport.abort()

    def _end_session(self, session: _Session, reason: str) -> None:
        self._fail_pending(f"the link to the hub went down: {reason}")
        if not session.live:
            log.info("connection ended before going live: %s", reason)
            return
        if time.monotonic() - session.live_since >= self._settings.heartbeat_s:
            self._backoff.reset()
        session.live = False
        level = logging.INFO if reason == _CLOSED_BY_AGENT else logging.WARNING
        log.log(level, "link down: %s (%d unconfirmed)", reason, session.unconfirmed_count())
        try:
            self._handler.on_down(reason)
        except Exception as exc:
            log.error("on_down handler raised %s", type(exc).__name__, exc_info=_debugging())

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionError(why))

    def _set_state(self, state: LinkState) -> None:
        if state is not self._state:
            log.debug("link state %s -> %s", self._state.name, state.name)
            self._state = state

    # -- session tasks ------------------------------------------------------------------------

    async def _read_loop(self, session: _Session) -> str:
        ws = session.ws
        while True:
            frame = await ws.recv(decode=False)
            self._frames_received += 1
            session.outstanding_heartbeats = 0  # any traffic proves the link alive
            reason = self._on_frame(session, frame)
            if reason is not None:
                return reason

    async def _write_loop(self, session: _Session) -> None:
        ws = session.ws
        wake = session.wake
        while True:
            await wake.wait()
            wake.clear()
            if session.frames:
                frames, session.frames = session.frames, []
                self._frames_sent += len(frames)
                await _write_text_frames(ws, frames)
            if session.transmits:
                messages, session.transmits = session.transmits, []
                await _write_text_frames(ws, self._encode_transmits(session, messages))

    async def _heartbeat_loop(self, session: _Session) -> str:
        period = self._settings.heartbeat_s
        max_missed = self._settings.max_missed_heartbeats
        while True:
            await asyncio.sleep(period)
            if not session.live:
                session.not_live_ticks += 1
                if session.not_live_ticks >= MAX_NOT_LIVE_TICKS:
                    return f"no agent:connect:response in {MAX_NOT_LIVE_TICKS} heartbeat periods"
                continue
            if session.outstanding_heartbeats >= max_missed:
                session.dead = True
                return f"no traffic from the hub for {max_missed} heartbeat periods (dead link)"
            session.outstanding_heartbeats += 1
            session.heartbeat_sent_at = time.monotonic()
            self._enqueue(session, _HEARTBEAT_REQUEST_FRAME)
            self._refresh_token_if_due()

    # -- sending ------------------------------------------------------------------------------

    def _enqueue(self, session: _Session, frame: bytes) -> None:
        session.frames.append(frame)
        session.wake.set()

    def _encode(self, message: m.AgentMessage) -> bytes:
        if type(message) is m.TransmitRequest:
            return _dumps(_transmit_dict(message, self._tokens.token, extensions=False))
        return _dumps(m.to_dict(message))

    def _encode_transmits(
        self, session: _Session, messages: list[m.TransmitRequest]
    ) -> list[bytes]:
        token = self._tokens.token
        dumps = _dumps
        self._transmits_sent += len(messages)
        if session.batch_limits is None:
            unconfirmed = session.unconfirmed
            frames = []
            for message in messages:
                frames.append(dumps(_transmit_dict(message, token, False)))
                unconfirmed.add(message.callback)  # type: ignore[arg-type]
            self._frames_sent += len(frames)
            return frames
        max_messages, max_bytes = session.batch_limits
        budget = min(max_bytes, BATCH_FRAME_TARGET_BYTES) - _BATCH_FRAME_OVERHEAD
        frames = []
        parts: list[bytes] = []
        callbacks: list[str] = []
        size = 0
        for message in messages:
            data = dumps(_transmit_dict(message, token, True))
            if parts and (len(parts) >= max_messages or size + len(data) > budget):
                frames.append(self._batch_frame(session, parts, callbacks))
                parts, callbacks, size = [], [], 0
            parts.append(data)
            callbacks.append(message.callback)  # type: ignore[arg-type]
            size += len(data) + 1
        frames.append(self._batch_frame(session, parts, callbacks))
        return frames

    def _batch_frame(self, session: _Session, parts: list[bytes], callbacks: list[str]) -> bytes:
        seq = session.next_seq
        session.next_seq = seq + 1
        session.unacked_batches.append((seq, callbacks))
        self._batches_sent += 1
        self._frames_sent += 1
        return b'{"type":"agent:batch","seq":%d,"messages":[%b]}' % (seq, b",".join(parts))

    def _refresh_token_if_due(self) -> None:
        running = self._refresh_task is not None and not self._refresh_task.done()
        if running or not self._tokens.refresh_due():
            return
        self._refresh_task = self._spawn(self._refresh_token(), "medagent-link-token")

    async def _refresh_token(self) -> None:
        try:
            await self._tokens.get_token()
        except (AuthError, HubUnavailableError) as exc:
            log.warning("token refresh failed (the current token stays in use): %s", exc)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- receiving ----------------------------------------------------------------------------

    def _on_frame(self, session: _Session, frame: bytes) -> str | None:
        """Handle one frame; returns a reason when the session must end."""
        try:
            message = m.decode(frame, "agent")
        except m.UnknownMessageType as exc:
            log.warning("unknown message type %r from the hub", exc.message_type)
            self._reply_error(session, str(exc), exc.callback)
            return None
        except m.ProtocolError as exc:
            log.warning("malformed frame from the hub (%d bytes): %s", len(frame), exc)
            self._reply_error(session, f"WebSocket error on incoming message: {exc}", exc.callback)
            return None
        try:
            if type(message) is m.Batch:
                self._messages_received += len(message.messages)
                for item in message.messages:
                    reason = self._on_message(session, item)
                    if reason is not None:
                        return reason
                return None
            self._messages_received += 1
            return self._on_message(session, message)
        except Exception as exc:
            log.error("handling %s failed: %s", message.TYPE, type(exc).__name__,
                      exc_info=_debugging())
            self._reply_error(session, f"WebSocket error on incoming message: {exc}",
                              _callback_of(message))
            return None

    def _on_message(self, session: _Session, message: m.AgentMessage) -> str | None:
        if self._pending and type(message) not in _HUB_REQUEST_TYPES:
            future = self._pending.get(_callback_of(message))  # type: ignore[arg-type]
            if future is not None:
                if not future.done():
                    future.set_result(message)
                return None
        handle = self._dispatch.get(type(message))
        if handle is None:  # a known type that only flows agent -> hub
            self._reply_error(session, f"Unknown message type: {message.TYPE}",
                              _callback_of(message))
            return None
        return handle(session, message)

    def _reply_error(self, session: _Session, body: str, callback: str | None) -> None:
        self._enqueue(session, self._encode(m.ErrorMessage(body=body, callback=callback)))

    def _confirm(self, callbacks: list[str]) -> None:
        self._confirmed += len(callbacks)
        self._handler.on_confirmed(callbacks)

    def _on_connect_response(self, session: _Session, message: m.ConnectResponse) -> None:
        if session.live:
            log.debug("duplicate agent:connect:response ignored")
            return
        features = types.MappingProxyType(dict(message.features or {}))
        session.features = features
        session.batch_limits = _batch_limits(features, self._settings)
        session.live = True
        session.live_since = time.monotonic()
        session.outstanding_heartbeats = 0
        self._last_error = None
        self._set_state(LinkState.LIVE)
        mode = "batch" if session.batch_limits is not None else "plain"
        log.info("link live (%s mode, hub features: %s)", mode,
                 ", ".join(sorted(features)) or "none")
        self._handler.on_live(features)

    def _on_heartbeat_request(self, session: _Session, message: m.HeartbeatRequest) -> None:
        reply = m.HeartbeatResponse(version=self._version, callback=message.callback)
        self._enqueue(session, m.encode(reply))

    def _on_heartbeat_response(self, session: _Session, message: m.HeartbeatResponse) -> None:
        if session.heartbeat_sent_at:
            self._last_ping_ms = (time.monotonic() - session.heartbeat_sent_at) * 1000.0
            session.heartbeat_sent_at = 0.0

    def _on_transmit_response(self, session: _Session, message: m.TransmitResponse) -> None:
        callback = message.callback
        if session.batch_limits is None and callback in session.unconfirmed:
            session.unconfirmed.discard(callback)  # type: ignore[arg-type]
            self._confirm([callback])  # type: ignore[list-item]
        self._handler.on_transmit_response(message)

    def _on_batch_ack(self, session: _Session, message: m.BatchAck) -> None:
        batches = session.unacked_batches
        callbacks: list[str] = []
        while batches and batches[0][0] <= message.seq:
            callbacks.extend(batches.popleft()[1])
        if callbacks:
            self._confirm(callbacks)

    def _on_error(self, session: _Session, message: m.ErrorMessage) -> str | None:
        callback = message.callback
        body = message.body[:_LOGGED_ERROR_CHARS]
        if INVALID_TOKEN_ERROR.lower() in message.body.lower():
            self._tokens.invalidate()
            log.error("the hub rejected the access token%s; reconnecting with a new one",
                      f" (for {callback})" if callback else "")
            return "the hub rejected the access token"
        if callback is not None:
            log.warning("hub answered %s with agent:error: %s", callback, body)
            if self._on_transmit_error is not None:
                self._on_transmit_error(callback, message.body)
            if session.batch_limits is None and callback in session.unconfirmed:
                session.unconfirmed.discard(callback)
                self._confirm([callback])
            return None
        if not session.live:
            log.error("the hub refused the connection: %s", body)
            return f"hub refused the connection: {body}"
        log.warning("agent:error from the hub: %s", body)
        return None

    def _on_hub_request(self, session: _Session, message: m.AgentMessage) -> None:
        self._spawn(self._answer(session, message), f"medagent-link-{message.TYPE}")

    async def _answer(self, session: _Session, request: m.AgentMessage) -> None:
        callback = _callback_of(request)
        try:
            reply = await self._handler.on_request(request)
        except Exception as exc:
            log.warning("%s %s failed: %s", request.TYPE, callback, type(exc).__name__,
                        exc_info=_debugging())
            reply = m.ErrorMessage(body=str(exc) or type(exc).__name__, callback=callback)
        if reply is None:
            return
        if callback is not None and getattr(reply, "callback", None) != callback:
            try:
                reply = dataclasses.replace(reply, callback=callback)  # type: ignore[call-arg]
            except TypeError:
                pass  # a message type without a callback (never a reply in practice)
        if self._session is not session:
            log.warning("reply to %s %s dropped: its connection is gone", request.TYPE, callback)
            return
        self._enqueue(session, self._encode(reply))


_HUB_REQUEST_TYPES = frozenset(
    {m.TransmitRequest, m.ReloadConfigRequest, m.UpgradeRequest, m.LogsRequest, m.StatsRequest}
)


async def _write_text_frames(ws: ClientConnection, frames: list[bytes]) -> None:
    """Write JSON frames as TEXT frames with as few awaits and socket writes as possible.

    ``ws.send()`` costs ~10 µs per frame (a context manager, a transport write and a drain each);
    framing a group of frames inside one ``send_context()`` and writing them together costs ~3 µs.
    ``send_context`` is part of websockets' asyncio connection (>= 13) but not of its documented
    API, so it is used only when present; otherwise every frame goes through ``ws.send()``.
    """
    if len(frames) == 1 or not _CAN_COALESCE:
        for frame in frames:
            await ws.send(frame, text=True)
        return
    for start in range(0, len(frames), _COALESCE_FRAMES):
        async with ws.send_context():
            send_text = ws.protocol.send_text
            for frame in frames[start : start + _COALESCE_FRAMES]:
                send_text(frame)


def _dumps(data: dict[str, Any]) -> bytes:
    """orjson, with lone surrogates (invalid in UTF-8 and JSON) replaced by U+FFFD if present."""
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        log.warning("a %s frame had characters JSON cannot carry; replaced with U+FFFD",
                    data.get("type"))
        return orjson.dumps(_without_surrogates(data))


_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_surrogates(v) for v in value]
    return value


def _callback_of(message: m.AgentMessage) -> str | None:
    return getattr(message, "callback", None)


def _debugging() -> bool:
    """Tracebacks may quote message content, so they are logged only at debug level."""
    return log.isEnabledFor(logging.DEBUG)


def _session_end_reason(done: set[asyncio.Task[Any]]) -> str:
    for task in done:
        if task.cancelled():
            continue
        exc = task.exception()
        if isinstance(exc, ConnectionClosed):
            return f"connection closed: {exc}"
        if exc is not None:
            raise exc
        if isinstance(task.result(), str):
            return task.result()
    return "session ended"
