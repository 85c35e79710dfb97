"""Outbound HL7 v2 over MLLP: a pool of client connections per remote device.

Theory of operation
-------------------
The hub pushes a message to a device with ``agent:transmit:request`` (medplum-protocol.md §6);
the runtime finds the pool through the registry (``channels.base.outbound_sender("mllp")``,
registered below) and calls :meth:`MllpClientPool.send` with the request's ``remote`` URL
(``mllp://host:port?encoding=..&defaultReturnAck=first|application&keepAlive=..``), the
message text and the request's ``returnAck``. The text is encoded with the remote's
``encoding`` (default UTF-8) and the device's reply decoded with its BOM or MSH-18, else with
that same encoding (issue 13, defect 5). :meth:`MllpClientPool.send_bytes` is the byte-level
API underneath. The pool:

1. parses the URL (``endpoint.parse_remote``) and reads MSH-10 (``proto.hl7.parse_header``);
   no MSH-10 -> :class:`MllpClientError` ``"MSH.10 is missing but required"``;
2. picks a connection of that remote (pools are keyed by the full URL string): an open one
   with nothing in flight, else a new one while fewer than ``max_clients_per_remote`` exist
   (connections being opened count), else the open ones round-robin;
3. registers a pending entry keyed by MSH-10, writes the MLLP frame, and waits up to
   ``response_timeout_s`` for the reply whose MSA-2 equals MSH-10:

   * ``first``: the first ACK of any code completes the send;
   * ``application``: a ``CA`` is skipped (counted), the send completes on AA/AE/AR/CE/CR.

   Precedence of the mode: the ``return_ack`` argument > the URL's ``defaultReturnAck`` >
   ``first``. Several sends may be in flight on one connection; replies are correlated by
   MSA-2 (two in-flight sends with the same MSH-10 are answered in FIFO order). Replies are
   read with ``proto.hl7.parse_ack`` (MSA values raw, as latin-1, like MSH-10 here).

Replies that match nothing are discarded and counted: ``late`` when their MSA-2 belongs to a
send that already timed out (the last 1024 per connection are remembered), ``mismatched``
otherwise. A connection that closes fails all its pending sends; a write error force-closes
the connection. A response timeout fails only that send (the connection stays, so other sends
on it may still complete). :meth:`collect_idle` (called on the heartbeat tick) closes
connections idle for ``idle_release_s`` or more, unless keep-alive is on (pool-wide, or per
remote with ``keepAlive=`` in the URL).

TLS (channels/tls.py, docs/tls.md): ``tls=true`` in the remote URL connects with TLS 1.2+ and
verifies the device's certificate and host name against the system trust store; ``tlsCa``
trusts a private CA instead (and implies ``tls=true``); ``tlsCert``/``tlsKey`` present a client
certificate. Rotated files are picked up at the next connect. A failed handshake is a
``"TLS handshake with ... failed: ..."`` error.

Every error is a :class:`MllpClientError` whose ``str()`` is the text returned to the hub in a
``statusCode: 400`` response: ``"connect to 10.0.0.5:2575 refused"``, ``"no ACK within 10 s
from 10.0.0.5:2575"``, ... It never contains message text (PHI).

Invariants
----------
* At most ``max_clients_per_remote`` connections (open or opening) per remote URL.
* Every pending send ends: with the reply, a timeout, the connection's close, or ``close()``.
* After :meth:`close`, no connection, timer or pending future of the pool is left.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, cast

from medagent.channels.base import OutboundReply, register_outbound_sender
from medagent.channels.endpoint import EndpointError, RemoteTarget, ReturnAck, parse_remote
from medagent.channels.tls import ClientTls, client_tls
from medagent.proto import hl7 as hl7proto
from medagent.proto.mllp import InvalidPayload, MllpDecoder, encode
from medagent.records import HL7_V2_CONTENT_TYPE

__all__ = ["MllpClientError", "MllpClientPool"]

logger = logging.getLogger(__name__)

#: How many timed-out control ids a connection remembers to tell late ACKs from strays.
_TIMED_OUT_MEMORY: Final = 1024


class MllpClientError(Exception):
    """An outbound send failed; ``str()`` is the reason given to the hub (no PHI)."""


@dataclass(slots=True)
class _RemoteStats:
    sent: int = 0
    acked: int = 0
    late: int = 0
    mismatched: int = 0
    commit_acks_skipped: int = 0
    errors: int = 0
    connects: int = 0


class _Pending:
    __slots__ = ("application", "future")

    def __init__(self, future: asyncio.Future[bytes], application: bool) -> None:
        self.future = future
        self.application = application


class _MllpClient(asyncio.Protocol):
    """One connection to a device: writes frames, routes ACKs to pending sends by MSA-2."""

    def __init__(self, remote: _Remote) -> None:
        self._remote = remote
        self._loop = asyncio.get_running_loop()
        self._decoder = MllpDecoder(remote.max_frame_size)
        self._transport: asyncio.Transport | None = None
        self._pending: dict[str, deque[_Pending]] = {}
        self._timed_out: deque[str] = deque(maxlen=_TIMED_OUT_MEMORY)
        self.in_flight = 0
        self.closed = False
        self.last_used = self._loop.time()

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def data_received(self, data: bytes) -> None:
        self.last_used = self._loop.time()
        try:
            frames = self._decoder.feed(data)
        except Exception as exc:  # FrameTooLarge: a device reply cannot legitimately be that big
            logger.warning("mllp client %s: %s; closing the connection", self._remote.address, exc)
            self.abort()
            return
        for frame in frames:
            self._route(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = f"connection to {self._remote.address} closed before the ACK arrived"
        self._fail_all(reason)
        self._remote.forget(self)

    # ------------------------------------------------------------------ sending

    def send(self, frame: bytes, control_id: str, application: bool) -> asyncio.Future[bytes]:
        """Write `frame` and return the future of its ACK (registered before the write)."""
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._pending.setdefault(control_id, deque()).append(_Pending(future, application))
        self.in_flight += 1
        self.last_used = self._loop.time()
        transport = self._transport
        try:
            if transport is None or transport.is_closing():
                raise ConnectionError("connection is closing")
            transport.write(frame)
        except Exception as exc:
            self._fail_all(f"sending to {self._remote.address} failed: {exc}")
            self.abort()
        return future

    def give_up(self, control_id: str, future: asyncio.Future[bytes]) -> None:
        """The send timed out or was cancelled: drop its pending entry, remember the id."""
        waiting = self._pending.get(control_id)
        if waiting is None:
            return
        for entry in waiting:
            if entry.future is future:
                waiting.remove(entry)
                self.in_flight -= 1
                self._timed_out.append(control_id)
                break
        if not waiting:
            del self._pending[control_id]

    # ------------------------------------------------------------------ receiving

    def _route(self, frame: bytes) -> None:
        stats = self._remote.stats
        try:
            info = hl7proto.parse_ack(frame)
        except hl7proto.Hl7Error:
            info = None
        if info is None:
            stats.mismatched += 1
            logger.warning("mllp client %s: discarded a reply without an MSA segment (%d bytes)",
                           self._remote.address, len(frame))
            return
        code, control_id = info.code, info.control_id
        waiting = self._pending.get(control_id)
        if not waiting:
            if control_id in self._timed_out:
                stats.late += 1
                logger.warning("mllp client %s: discarded a late ACK for message %s", self._remote.address, control_id)
            else:
                stats.mismatched += 1
                logger.warning("mllp client %s: discarded an ACK for unknown message %s",
                               self._remote.address, control_id)
            return
        entry = waiting[0]
        if entry.application and code.strip().upper() == "CA":
            stats.commit_acks_skipped += 1
            return
        waiting.popleft()
        if not waiting:
            del self._pending[control_id]
        self.in_flight -= 1
        if not entry.future.done():
            stats.acked += 1
            entry.future.set_result(frame)

    # ------------------------------------------------------------------ closing

    def _fail_all(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        self.in_flight = 0
        for waiting in pending.values():
            for entry in waiting:
                if not entry.future.done():
                    entry.future.set_exception(MllpClientError(reason))

    def abort(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


class _Remote:
    """The connections of one remote URL."""

    def __init__(self, pool: MllpClientPool, url: str, target: RemoteTarget) -> None:
        self.pool = pool
        self.url = url
        self.target = target
        self.address = f"{target.host}:{target.port}"
        self.max_frame_size = pool.max_reply_size
        self.clients: list[_MllpClient] = []
        self.opening: list[asyncio.Future[_MllpClient]] = []
        self.stats = _RemoteStats()
        self._round_robin = itertools.count()
        self._tls: ClientTls | None = None

    @property
    def keep_alive(self) -> bool:
        return self.pool.keep_alive if self.target.keep_alive is None else self.target.keep_alive

    async def client(self) -> _MllpClient:
        """An idle open connection, else a new one (under the limit), else round-robin."""
        for client in self.clients:
            if client.in_flight == 0 and not client.closed:
                return client
        if len(self.clients) + len(self.opening) < self.pool.max_clients_per_remote:
            task = asyncio.ensure_future(self._connect())
            self.opening.append(task)
            try:
                return await asyncio.shield(task)
            finally:
                if task in self.opening:
                    self.opening.remove(task)
        if not self.clients:  # every allowed connection is still being opened: share one
            return await asyncio.shield(self.opening[0])
        return self.clients[next(self._round_robin) % len(self.clients)]

    async def _connect(self) -> _MllpClient:
        loop = asyncio.get_running_loop()
        timeout = self.pool.connect_timeout_s
        tls: dict[str, Any] = {}
        if self.target.tls is not None:
            try:
                if self._tls is None:
                    self._tls = client_tls(f"mllp remote {self.address}", self.target.tls)
                assert self._tls is not None
                tls = {"ssl": self._tls.current(), "server_hostname": self.target.host}
            except (OSError, ssl.SSLError) as exc:
                raise MllpClientError(f"TLS files for {self.address} do not load: {exc}") from None
        try:
            _, client = await asyncio.wait_for(
                loop.create_connection(lambda: _MllpClient(self), self.target.host, self.target.port, **tls),
                timeout,
            )
        except TimeoutError:
            raise MllpClientError(f"connect to {self.address} timed out after {timeout:g} s") from None
        except ConnectionRefusedError:
            raise MllpClientError(f"connect to {self.address} refused") from None
        except ssl.SSLError as exc:  # before OSError: SSLError is one
            raise MllpClientError(f"TLS handshake with {self.address} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise MllpClientError(f"connect to {self.address} failed: {exc.strerror or exc}") from None
        self.stats.connects += 1
        if self.pool.closed:
            client.close()
            raise MllpClientError("the MLLP client pool is closed")
        self.clients.append(client)
        return client

    def forget(self, client: _MllpClient) -> None:
        if client in self.clients:
            self.clients.remove(client)


class MllpClientPool:
    """Outbound MLLP connections, pooled per remote URL (see the module docstring)."""

    def __init__(self, *, max_clients_per_remote: int = 5, keep_alive: bool = False,
                 connect_timeout_s: float = 10.0, response_timeout_s: float = 10.0,
                 idle_release_s: float = 10.0, max_reply_size: int = 16 * 1024 * 1024) -> None:
        if max_clients_per_remote < 1:
            raise ValueError(f"max_clients_per_remote must be >= 1, not {max_clients_per_remote}")
        self.max_clients_per_remote = max_clients_per_remote
        self.keep_alive = keep_alive
        self.connect_timeout_s = connect_timeout_s
        self.response_timeout_s = response_timeout_s
        self.idle_release_s = idle_release_s
        self.max_reply_size = max_reply_size
        self.closed = False
        self._remotes: dict[str, _Remote] = {}

    def _remote(self, remote_url: str) -> _Remote:
        remote = self._remotes.get(remote_url)
        if remote is None:
            try:
                target = parse_remote(remote_url)
            except EndpointError as exc:
                raise MllpClientError(str(exc)) from None
            remote = self._remotes[remote_url] = _Remote(self, remote_url, target)
        return remote

    def target(self, remote_url: str) -> RemoteTarget:
        """The parsed remote (host, port, encoding to encode the message with, ...)."""
        return self._remote(remote_url).target

    @staticmethod
    def _return_ack(return_ack: str | None, target: RemoteTarget) -> ReturnAck:
        if return_ack is None:
            return target.default_return_ack
        try:
            return ReturnAck(return_ack.strip().lower())
        except ValueError:
            raise MllpClientError(f"invalid returnAck {return_ack!r}; expected 'first' or 'application'") from None

    async def send(self, remote_url: str, body: str | bytes, content_type: str | None = None, *,
                   return_ack: str | None = None, timeout: float | None = None) -> OutboundReply:
        """OutboundSender: send the text `body` to `remote_url` in the remote's encoding.

        The reply is decoded with its BOM or MSH-18, else with the remote's encoding.
        DEPRECATED form, kept until the runtime calls through the registry: ``send(remote_url,
        message_bytes, return_ack)`` returns the raw ACK bytes (see :meth:`send_bytes`).
        """
        if isinstance(body, (bytes, bytearray)):
            return await self.send_bytes(remote_url, bytes(body), return_ack if return_ack is not None  # type: ignore[return-value]
                                         else content_type, timeout=timeout)
        encoding = self.target(remote_url).encoding
        try:
            payload = body.encode(encoding)
        except UnicodeEncodeError as exc:
            raise MllpClientError(f"the message cannot be encoded as {encoding} "
                                  f"(unencodable character at offset {exc.start})") from None
        reply = await self.send_bytes(remote_url, payload, return_ack, timeout=timeout)
        try:
            text = hl7proto.decode(reply, encoding)
        except hl7proto.Hl7Error:  # not decodable as declared: keep what can be read
            text = reply.decode(encoding, errors="replace")
        return OutboundReply(text, HL7_V2_CONTENT_TYPE)

    async def send_bytes(self, remote_url: str, message: bytes, return_ack: str | None = None, *,
                         timeout: float | None = None) -> bytes:
        """Send `message` to the device at `remote_url`; return the raw ACK payload (see module doc)."""
        if self.closed:
            raise MllpClientError("the MLLP client pool is closed")
        remote = self._remote(remote_url)
        stats = remote.stats
        try:
            mode = self._return_ack(return_ack, remote.target)
            control_id = self._control_id(message)
            frame = encode(message)
        except InvalidPayload as exc:
            stats.errors += 1
            raise MllpClientError(str(exc)) from None
        except MllpClientError:
            stats.errors += 1
            raise
        try:
            client = await remote.client()
        except MllpClientError:
            stats.errors += 1
            raise
        stats.sent += 1
        wait = self.response_timeout_s if timeout is None else timeout
        future = client.send(frame, control_id, mode is ReturnAck.APPLICATION)
        try:
            return await asyncio.wait_for(asyncio.shield(future), wait)
        except TimeoutError:
            client.give_up(control_id, future)
            stats.errors += 1
            raise MllpClientError(f"no ACK within {wait:g} s from {remote.address}") from None
        except asyncio.CancelledError:
            client.give_up(control_id, future)
            raise
        except MllpClientError:
            stats.errors += 1
            raise

    @staticmethod
    def _control_id(message: bytes) -> str:
        try:
            header = hl7proto.parse_header(message)
        except hl7proto.Hl7Error as exc:
            raise MllpClientError(f"not an HL7 v2 message: {exc}") from None
        if not header.control_id.strip():
            raise MllpClientError("MSH.10 is missing but required")
        return header.control_id

    def collect_idle(self) -> None:
        """Close connections idle for idle_release_s or more (not for keep-alive remotes)."""
        now = asyncio.get_running_loop().time()
        for remote in self._remotes.values():
            if remote.keep_alive:
                continue
            for client in list(remote.clients):
                if client.in_flight == 0 and now - client.last_used >= self.idle_release_s:
                    remote.forget(client)
                    client.close()

    async def close(self) -> None:
        """Close every connection; pending sends fail with MllpClientError."""
        self.closed = True
        clients = [client for remote in self._remotes.values() for client in remote.clients]
        for client in clients:
            client.close()
        for _ in range(50):  # let connection_lost run (bounded)
            if all(client.closed for client in clients):
                break
            await asyncio.sleep(0.01)
        for remote in self._remotes.values():
            remote.clients.clear()

    def stats(self) -> dict[str, Any]:
        """Per remote URL: clients open, sent, acked, late, mismatched, skipped CAs, errors."""
        return {
            url: {"clients": len(remote.clients), "opening": len(remote.opening), "sent": remote.stats.sent,
                  "acked": remote.stats.acked, "late": remote.stats.late, "mismatched": remote.stats.mismatched,
                  "commit_acks_skipped": remote.stats.commit_acks_skipped, "errors": remote.stats.errors,
                  "connects": remote.stats.connects}
            for url, remote in self._remotes.items()
        }


register_outbound_sender("mllp", MllpClientPool)
