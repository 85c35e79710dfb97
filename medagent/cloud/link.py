"""The agent's websocket link to the hub: the I/O skin around :mod:`medagent.proto.agent_session`.

Theory of operation
-------------------
The protocol itself — connect sequencing, heartbeat bookkeeping and dead-link detection, batch
sequence numbers and cumulative acks, correlation by callback, answers to bad frames — lives in
the pure :class:`~medagent.proto.agent_session.AgentSession`. This module does the I/O around it.
One supervisor task (:meth:`AgentLink.start`) loops until :meth:`AgentLink.close`:

1. get an access token (:class:`~medagent.cloud.auth.TokenClient`, OAuth2 client credentials);
2. open ``ws(s)://<host>/ws/agent`` (medplum-protocol.md §1.2: scheme https→wss, http→ws, path
   replaced) with :func:`~medagent.cloud.wsclient.open_websocket` (proxies from the environment)
   and let a fresh session core queue ``agent:connect:request {accessToken, agentId}``;
3. run the connection: every received message goes to the core from the transport's
   ``data_received`` and its events go to the :class:`LinkHandler`; a writer task writes what the
   core has to send, many frames in one socket write; a ticker task calls the core's ``tick`` at
   its ``next_deadline()`` (heartbeats every ``heartbeat_s``, §1.3) and renews the token before
   it expires;
4. when the core ends the session (connect refused, token rejected, no connect response after 2
   ticks, no traffic for ``max_missed_heartbeats`` ticks: a dead link is aborted, not closed) or
   the socket closes, back off (jittered exponential, ``reconnect_min_s`` .. ``reconnect_max_s``)
   and start over. The backoff resets after a session that stayed live for a heartbeat period.

Sending. :meth:`AgentLink.send_transmit` is the hot path: the core appends the message to its list
and one write is scheduled for the end of the loop turn (``call_soon``) — no task, future or
encoding per message. A caller that queued a batch ends it with :meth:`AgentLink.flush`, so the
frame leaves in the same turn (at one sender that is a loop turn and two task wake-ups fewer per
message). The write runs on the loop and writes everything the core encodes; only when the socket
pushed back (above the write buffer's high-water mark) or is not open does the writer task take
over, waiting for the drain (or ending the session). Frames are ``agent:batch`` when the hub
advertised ``features.batch`` and ``use_batching`` is on, else one frame per message; see the
core). A hub ``"Invalid access token"`` marks the token for renewal, so the next attempt connects
with a new one and the runtime re-sends what was unconfirmed (``on_down``).

Receiving. Hub requests (outbound transmit, reloadconfig, logs, stats, upgrade) run
:meth:`LinkHandler.on_request` in a task; the reply gets the request's callback. An ``agent:error``
carrying a callback is reported to the handler's optional ``on_transmit_error(callback, reason)``
before any confirmation, so the runtime can record that the hub refused that message.

Proxies: ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``/``NO_PROXY`` from the environment are
honoured for the token requests (aiohttp ``trust_env``) and the websocket (HTTP ``CONNECT``), as a
hospital network often requires.

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
import functools
import logging
import random
import ssl
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import medagent
from medagent.cloud import messages as m
from medagent.cloud.auth import AuthError, HubUnavailableError, TokenClient, build_ssl_context
from medagent.cloud.wsclient import WebSocketClient, open_websocket
from medagent.proto import agent_session as core
from medagent.proto.agent_session import AgentSession, BatchSettings, EndKind, SessionEnd

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
#: How long a graceful websocket close may take before the socket is aborted.
_CLOSE_TIMEOUT_S = 2.0
#: Error bodies from the hub are logged up to this length (they are error texts, not messages).
_LOGGED_ERROR_CHARS = 200

_CLOSED_BY_AGENT = "link closed by the agent"
#: The per-session counters that stats() sums over all sessions.
_COUNTERS = ("frames_sent", "frames_received", "messages_received", "transmits_sent",
             "batches_sent", "confirmed")


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


class _Connection:
    """One websocket connection: its session core, its socket and the writer's wake-up."""

    __slots__ = ("abort", "client", "core", "ended", "live_since", "wake", "write_handle")

    def __init__(self, session: AgentSession) -> None:
        self.core = session
        self.client: WebSocketClient | None = None
        #: wakes the writer task, which writes only when the socket pushed back (drain) or is not open
        self.wake = asyncio.Event()
        #: a write of what the core holds, scheduled for the end of this loop turn (AgentLink._write_soon)
        self.write_handle: asyncio.Handle | None = None
        #: resolved with the reason when the core ends the session
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.abort = False  # dead link: drop the socket instead of a closing handshake
        self.live_since = 0.0


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
        self._batching = BatchSettings(settings.use_batching, settings.max_batch_messages,
                                       settings.max_batch_bytes)
        try:  # the core validates the protocol settings; fail at construction, not per connect
            self._new_core()
        except ValueError as exc:
            raise LinkConfigError(str(exc)) from None
        self._state = LinkState.STOPPED
        self._conn: _Connection | None = None
        self._runner: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._refresh_task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[m.AgentMessage]] = {}
        self._last_error: str | None = None
        self._on_transmit_error: Callable[[str, str], None] | None = getattr(
            handler, "on_transmit_error", None
        )
        self._connects = 0
        self._totals = dict.fromkeys(_COUNTERS, 0)  # counters of the sessions that ended
        self._last_ping_ms: float | None = None

    @staticmethod
    def _tls_context(settings: LinkSettings) -> ssl.SSLContext:
        try:
            return build_ssl_context(settings.ca_file, settings.verify_tls)
        except (OSError, ssl.SSLError) as exc:
            raise LinkConfigError(f"ca_file {settings.ca_file!r} cannot be used: {exc}") from None

    def _new_core(self) -> AgentSession:
        return AgentSession(
            version=self._version, now=time.monotonic(), heartbeat_s=self._settings.heartbeat_s,
            max_missed_heartbeats=self._settings.max_missed_heartbeats, batching=self._batching,
        )

    # -- public API ---------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        conn = self._conn
        return conn is not None and conn.core.live

    @property
    def features(self) -> Mapping[str, Any]:
        """What the hub advertised in its connect response (``{}`` for Medplum or when not live)."""
        conn = self._conn
        return conn.core.features if conn is not None else _NO_FEATURES

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
        conn = self._conn
        if conn is None or not conn.core.send_transmit(message):
            return False
        if conn.write_handle is None:
            self._write_soon(conn)
        return True

    def flush(self) -> None:
        """Write what is queued now (a caller that queued a batch of transmits in this loop turn
        ends it with this: the frame leaves in the same turn, the scheduled write finds nothing)."""
        conn = self._conn
        if conn is not None:
            self._write_now(conn)

    def send(self, message: m.AgentMessage) -> None:
        """Fire-and-forget any other frame; dropped (and logged at debug) when not connected."""
        conn = self._conn
        if conn is None:
            log.debug("not connected: %s dropped", message.TYPE)
            return
        conn.core.send(message)
        if conn.write_handle is None:
            self._write_soon(conn)

    async def request(
        self, message: m.AgentMessage, timeout: float | None = None
    ) -> m.AgentMessage:
        """Send ``message`` and return the hub's frame with the same callback.

        A callback is generated when missing. Raises ``TimeoutError`` after ``timeout`` (default
        ``request_timeout_s``) and ``ConnectionError`` when the link is not live or drops first.
        """
        conn = self._conn
        if conn is None or not conn.core.live:
            raise ConnectionError("the link to the hub is not live")
        callback = _callback_of(message)
        if callback is None:
            new_callback = m.new_callback(self._settings.agent_id)
            try:
                message = dataclasses.replace(message, callback=new_callback)  # type: ignore
            except TypeError:
                raise ValueError(f"{message.TYPE} has no callback field") from None
            callback = new_callback
        if callback in self._pending:
            raise ValueError(f"a request with callback {callback} is already waiting")
        conn.core.expect_reply(callback)
        future: asyncio.Future[m.AgentMessage] = asyncio.get_running_loop().create_future()
        self._pending[callback] = future
        limit = self._settings.request_timeout_s if timeout is None else timeout
        try:
            conn.core.send(message)
            conn.wake.set()
            async with asyncio.timeout(limit):
                return await future
        except TimeoutError:
            raise TimeoutError(
                f"no reply to {message.TYPE} {callback} within {limit:g} s"
            ) from None
        finally:
            self._pending.pop(callback, None)
            conn.core.forget(callback)

    async def fetch_json(self, path: str) -> dict[str, Any]:
        """Authenticated REST ``GET`` on the hub (e.g. ``/fhir/R4/Agent/<id>``)."""
        return await self._tokens.fetch_json(path)

    def stats(self) -> dict[str, Any]:
        """Counters and state for status pages and ``agent:stats``."""
        conn = self._conn
        session = conn.core if conn is not None else None
        count = self._totals.copy()
        if session is not None:
            for name in _COUNTERS:
                count[name] += getattr(session, name)
        return {
            "state": self._state.name.lower(),
            "live": self.live,
            "url": self._url,
            "batching": session is not None and session.batch_limits is not None,
            "connects": self._connects,
            "reconnects": max(0, self._connects - 1),
            "frames_sent": count["frames_sent"],
            "frames_received": count["frames_received"],
            "messages_sent": count["transmits_sent"],
            "messages_received": count["messages_received"],
            "batches_sent": count["batches_sent"],
            "confirmed": count["confirmed"],
            "unconfirmed": session.unconfirmed_count() if session is not None else 0,
            "backlog": session.backlog() if session is not None else 0,
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
        conn = _Connection(self._new_core())
        try:
            conn.client = await open_websocket(
                self._url,
                on_message=functools.partial(self._on_frame, conn),
                ssl=self._ssl,
                open_timeout=self._settings.request_timeout_s,
                close_timeout=_CLOSE_TIMEOUT_S,
                max_size=MAX_FRAME_BYTES,
                user_agent=f"medagent/{self._version}",
            )
        except Exception as exc:  # noqa: BLE001 - OSError, TLS, InvalidHandshake, TimeoutError, proxy...
            reason = f"cannot open {self._url}: {type(exc).__name__}: {exc}"
            log.warning("%s", reason)
            return reason
        try:
            return await self._run_session(conn, token)
        except Exception as exc:  # a bug must not stop the supervisor for good
            log.error("link session failed: %s", type(exc).__name__, exc_info=_debugging())
            return f"internal error: {type(exc).__name__}"

    async def _run_session(self, conn: _Connection, token: str) -> str:
        client = conn.client
        assert client is not None
        self._conn = conn
        self._connects += 1
        reason = _CLOSED_BY_AGENT
        try:
            conn.core.connect(token, self._settings.agent_id)
            conn.wake.set()
            tasks = [
                asyncio.create_task(self._write_loop(conn), name="medagent-link-writer"),
                asyncio.create_task(self._tick_loop(conn), name="medagent-link-ticker"),
            ]
            try:
                waits: list[asyncio.Future[Any]] = [*tasks, conn.ended, client.closed]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            reason = _session_end_reason(conn, client, tasks)
        finally:
            self._conn = None
            if conn.write_handle is not None:
                conn.write_handle.cancel()
                conn.write_handle = None
            conn.core.close()
            await self._close_socket(conn, client)
            self._end_session(conn, reason)
        return reason

    async def _close_socket(self, conn: _Connection, client: WebSocketClient) -> None:
        if conn.abort:
            client.abort()  # a dead link would not answer a closing handshake
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S + 0.5):
                await client.close()
        except asyncio.CancelledError:
            client.abort()
            raise
        except BaseException:  # noqa: BLE001 - a timeout or socket error here: just drop the socket
            client.abort()

    def _end_session(self, conn: _Connection, reason: str) -> None:
        session = conn.core
        for name in _COUNTERS:
            self._totals[name] += getattr(session, name)
        self._fail_pending(f"the link to the hub went down: {reason}")
        if not conn.live_since:
            log.info("connection ended before going live: %s", reason)
            return
        if time.monotonic() - conn.live_since >= self._settings.heartbeat_s:
            self._backoff.reset()
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

    # -- the connection's tasks -----------------------------------------------------------------

    def _write_soon(self, conn: _Connection) -> None:
        """Write what the core holds at the end of this loop turn: what is queued meanwhile goes
        in the same write, and no task is woken (a handle instead of two task steps per frame)."""
        conn.write_handle = asyncio.get_running_loop().call_soon(self._write_now, conn)

    def _write_now(self, conn: _Connection) -> None:
        """Write what the core holds on the loop, or leave it to the writer task when the socket
        pushed back or is not open (the task waits for the drain, or ends the session)."""
        handle, conn.write_handle = conn.write_handle, None
        if handle is not None:
            handle.cancel()  # flush() came first: the scheduled write has nothing left to do
        client = conn.client
        if client is None or not client.writable:
            conn.wake.set()
            return
        session = conn.core
        if not session.has_data():
            return
        token = self._tokens.token
        if token is not None:
            session.access_token = token  # the Medplum agent fills it in at send time (§1.1)
        client.send_text_frames(session.data_to_send())
        if not client.writable:
            conn.wake.set()  # above the high-water mark: the writer task waits for the drain

    async def _write_loop(self, conn: _Connection) -> None:
        """The slow path of _write_now: wait until the socket drained, then write what waits;
        a closed socket raises here, which ends the session."""
        session, client, wake, tokens = conn.core, conn.client, conn.wake, self._tokens
        assert client is not None
        while True:
            await wake.wait()
            wake.clear()
            await client.drain()
            token = tokens.token
            if token is not None:
                session.access_token = token
            frames = session.data_to_send()
            if frames:
                client.send_text_frames(frames)
                await client.drain()

    async def _tick_loop(self, conn: _Connection) -> None:
        session = conn.core
        while True:
            delay = session.next_deadline() - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._handle(conn, session.tick(time.monotonic()))
            if session.has_data() and conn.write_handle is None:
                self._write_soon(conn)
            if session.live:
                self._refresh_token_if_due()

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

    def _on_frame(self, conn: _Connection, frame: bytes) -> None:
        """One message from the hub (called from the transport's data_received)."""
        session = conn.core
        events = session.receive_frame(frame)
        if events:
            try:
                self._handle(conn, events)
            except Exception as exc:  # a handler bug: answer like the Medplum agent, keep going
                log.error("handling a frame from the hub failed: %s", type(exc).__name__,
                          exc_info=_debugging())
                session.send(m.ErrorMessage(body=f"WebSocket error on incoming message: {exc}"))
        if session.has_data() and conn.write_handle is None:
            self._write_soon(conn)

    def _handle(self, conn: _Connection, events: list[core.Event]) -> None:
        handler = self._handler
        for event in events:
            kind = type(event)
            if kind is core.Confirmed:
                handler.on_confirmed(event.callbacks)  # type: ignore[union-attr]
            elif kind is core.TransmitAnswered:
                handler.on_transmit_response(event.message)  # type: ignore[union-attr,arg-type]
            elif kind is core.Reply:
                future = self._pending.get(_callback_of(event.message))  # type: ignore
                if future is not None and not future.done():
                    future.set_result(event.message)  # type: ignore[union-attr]
            elif kind is core.Request:
                request = event.message  # type: ignore[union-attr]
                self._spawn(self._answer(conn, request), f"medagent-link-{request.TYPE}")
            elif kind is core.TransmitFailed:
                log.warning("hub answered %s with agent:error: %s", event.callback,  # type: ignore
                            event.reason[:_LOGGED_ERROR_CHARS])  # type: ignore[union-attr]
                if self._on_transmit_error is not None:
                    self._on_transmit_error(event.callback, event.reason)  # type: ignore
            elif kind is core.HeartbeatAnswered:
                if event.sent_at is not None:  # type: ignore[union-attr]
                    self._last_ping_ms = (time.monotonic() - event.sent_at) * 1000.0  # type: ignore
            elif kind is core.Live:
                self._on_live(conn, event.features)  # type: ignore[union-attr]
            elif kind is core.PeerError:
                log.warning("agent:error from the hub: %s",
                            event.body[:_LOGGED_ERROR_CHARS])  # type: ignore[union-attr]
            elif kind is core.Violation:
                log.warning("bad frame from the hub (%d bytes, answered with agent:error): %s",
                            event.size, event.problem)  # type: ignore[union-attr]
            elif kind is SessionEnd:
                self._on_session_end(conn, event)  # type: ignore[arg-type]

    def _on_live(self, conn: _Connection, features: Mapping[str, Any]) -> None:
        conn.live_since = time.monotonic()
        self._last_error = None
        self._set_state(LinkState.LIVE)
        mode = "batch" if conn.core.batch_limits is not None else "plain"
        log.info("link live (%s mode, hub features: %s)", mode,
                 ", ".join(sorted(features)) or "none")
        self._handler.on_live(features)

    def _on_session_end(self, conn: _Connection, event: SessionEnd) -> None:
        if event.kind is EndKind.TOKEN_REJECTED:
            self._tokens.invalidate()
            log.error("the hub rejected the access token; reconnecting with a new one")
        elif event.kind is EndKind.REFUSED:
            log.error("%s", event.reason[:_LOGGED_ERROR_CHARS])
        conn.abort = event.abort
        if not conn.ended.done():
            conn.ended.set_result(event.reason)

    async def _answer(self, conn: _Connection, request: m.AgentMessage) -> None:
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
        if self._conn is not conn:
            log.warning("reply to %s %s dropped: its connection is gone", request.TYPE, callback)
            return
        conn.core.send(reply)
        conn.wake.set()


_NO_FEATURES: Mapping[str, Any] = types.MappingProxyType({})


def _callback_of(message: m.AgentMessage) -> str | None:
    return getattr(message, "callback", None)


def _debugging() -> bool:
    """Tracebacks may quote message content, so they are logged only at debug level."""
    return log.isEnabledFor(logging.DEBUG)


def _session_end_reason(conn: _Connection, client: WebSocketClient,
                        tasks: list[asyncio.Task[None]]) -> str:
    if conn.ended.done():
        return conn.ended.result()
    if client.closed.done():
        return f"connection closed: {client.closed.result()}"
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, ConnectionError):
                return f"connection closed: {exc}"
            raise exc  # type: ignore[misc]
    return "session ended"
