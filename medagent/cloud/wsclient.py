"""A websocket client transport: websockets' sans-I/O protocol on an asyncio transport.

Theory of operation
-------------------
websockets documents its sans-I/O layer (``websockets.client.ClientProtocol``) for exactly this:
the caller owns the socket, feeds received bytes with ``receive_data`` and writes what
``data_to_send`` returns (websockets docs, "Integrate the Sans-I/O layer"). Owning the socket is
what lets :meth:`WebSocketClient.send_text_frames` frame many messages and hand them to the
kernel in **one** ``transport.write`` — the link's hot path under load — with public API only
(websockets' asyncio connection writes and drains once per frame).

:func:`open_websocket` resolves an HTTP proxy from the environment (``HTTPS_PROXY`` for wss,
``HTTP_PROXY`` for ws, ``ALL_PROXY``, honouring ``NO_PROXY``; RFC 9110 §9.3.6 ``CONNECT``),
opens TCP (and TLS, with SNI), runs the opening handshake (RFC 6455 §4) and returns the client.
Every complete message (text or binary; fragments are joined, RFC 6455 §5.4) is passed to the
``on_message`` callback from ``data_received``, so a frame is handled in the loop iteration that
read it. Pings are answered by the protocol; close frames are answered and the TCP connection is
closed when the closing handshake ends or after ``close_timeout`` (RFC 6455 §7).

Invariants: frames are written in the order given; nothing is written after the connection
started closing; :attr:`WebSocketClient.closed` resolves exactly once, with the reason, when the
TCP connection is gone; nothing here logs payloads.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl as ssl_module
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidURI
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

__all__ = ["ProxyError", "WebSocketClient", "open_websocket"]

#: Frames joined into one socket write (bounds one write's buffer to a few MiB).
_FRAMES_PER_WRITE = 256
_MAX_PROXY_RESPONSE = 16 * 1024


class ProxyError(ConnectionError):
    """The proxy refused the tunnel or is not usable."""


class WebSocketClient(asyncio.Protocol):
    """One open websocket connection (see the module docstring)."""

    def __init__(self, protocol: ClientProtocol, on_message: Callable[[bytes], None],
                 close_timeout: float) -> None:
        self.protocol = protocol
        self._on_message = on_message
        self._close_timeout = close_timeout
        self._transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self._handshake: asyncio.Future[None] = loop.create_future()
        #: resolves with the reason once the TCP connection is closed
        self.closed: asyncio.Future[str] = loop.create_future()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._fragments: list[bytes] = []
        self._close_timer: asyncio.TimerHandle | None = None

    # -- writing --

    @property
    def writable(self) -> bool:
        """Open, and the transport's write buffer below its high-water mark: a write now neither
        raises nor needs a drain first."""
        transport = self._transport
        return (self._can_write.is_set() and self.protocol.state is State.OPEN and transport is not None
                and not transport.is_closing())

    def send_text_frames(self, frames: Iterable[bytes]) -> None:
        """Frame each item as one TEXT message and write them together.

        Raises ConnectionError when the connection is not open (closing or closed).
        """
        protocol, transport = self.protocol, self._transport
        if protocol.state is not State.OPEN or transport is None or transport.is_closing():
            raise ConnectionError("the websocket is not open")
        send_text = protocol.send_text
        pending = 0
        for frame in frames:
            send_text(frame)
            pending += 1
            if pending == _FRAMES_PER_WRITE:
                transport.write(b"".join(protocol.data_to_send()))
                pending = 0
        if pending:
            transport.write(b"".join(protocol.data_to_send()))

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        if not self._can_write.is_set():
            waiter: asyncio.Future[Any] = asyncio.ensure_future(self._can_write.wait())
            await asyncio.wait([waiter, self.closed], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if self.closed.done():
                raise ConnectionError(self.closed.result())

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Closing handshake, bounded by ``close_timeout``; then the socket is closed for sure."""
        transport = self._transport
        if self.protocol.state is State.OPEN and transport is not None and not transport.is_closing():
            self.protocol.send_close(code, reason)
            self._flush()
        try:
            # not wait_for: on Python 3.11 it can swallow a cancellation that arrives just as the
            # shielded future completes, and AgentLink.close() would never end
            async with asyncio.timeout(self._close_timeout):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self.abort()
            await asyncio.shield(self.closed)

    def abort(self) -> None:
        """Drop the TCP connection now (a dead link will not answer a closing handshake)."""
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        self._transport.set_write_buffer_limits(high=2**20)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._process()
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        protocol = self.protocol
        if protocol.state is not State.CLOSED:
            try:
                protocol.receive_eof()  # the protocol reaches CLOSED and knows the close code
            except EOFError:
                pass  # EOF was already fed (eof_received)
            protocol.data_to_send()
        self._can_write.set()
        if not self._handshake.done():
            self._handshake.set_exception(ConnectionError(f"connection lost during the handshake: {exc}"))
        if not self.closed.done():
            try:
                reason = str(protocol.close_exc)
            except AssertionError:
                reason = f"connection lost: {exc}" if exc else "connection lost"
            self.closed.set_result(reason)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- internals --

    def _process(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self._on_frame(event)
            elif isinstance(event, Response) and not self._handshake.done():
                failure = self.protocol.handshake_exc
                if failure is None:
                    self._handshake.set_result(None)
                else:
                    self._handshake.set_exception(failure)
        self._flush()

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._on_message(frame.data)  # type: ignore[arg-type]
            else:
                self._fragments = [bytes(frame.data)]
        elif opcode is Opcode.CONT and self._fragments:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), []
                self._on_message(data)
        # PING, PONG and CLOSE are handled by the protocol (answers are in data_to_send)

    def _flush(self) -> None:
        transport = self._transport
        if transport is None:
            return
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():  # b"" = half-close after the closing handshake
                transport.write_eof()
            else:
                transport.close()
        if self.protocol.close_expected() and self._close_timer is None:
            # the server should close TCP now; if it does not, we do (RFC 6455 §7.1.1)
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(self._close_timeout, transport.abort)


async def open_websocket(
    url: str,
    *,
    on_message: Callable[[bytes], None],
    ssl: ssl_module.SSLContext | None = None,
    open_timeout: float = 10.0,
    close_timeout: float = 2.0,
    max_size: int = 2**20,
    user_agent: str | None = None,
) -> WebSocketClient:
    """Connect (through the environment's HTTP proxy, if any) and finish the opening handshake."""
    try:
        uri = parse_uri(url)
    except InvalidURI as exc:
        raise ValueError(str(exc)) from None
    protocol = ClientProtocol(uri, max_size=max_size)  # no extensions: no permessage-deflate
    loop = asyncio.get_running_loop()
    tls = (ssl or ssl_module.create_default_context()) if uri.secure else None
    async with asyncio.timeout(open_timeout):
        sock = await _proxy_tunnel(uri.host, uri.port, secure=uri.secure, user_agent=user_agent)
        if sock is None:
            _, client = await loop.create_connection(
                lambda: WebSocketClient(protocol, on_message, close_timeout), uri.host, uri.port,
                ssl=tls, server_hostname=uri.host if tls is not None else None,
            )
        else:
            _, client = await loop.create_connection(
                lambda: WebSocketClient(protocol, on_message, close_timeout), sock=sock,
                ssl=tls, server_hostname=uri.host if tls is not None else None,
            )
        try:
            _set_nodelay(client)
            request = protocol.connect()
            if user_agent is not None:
                request.headers["User-Agent"] = user_agent
            protocol.send_request(request)
            client._flush()
            await asyncio.shield(client._handshake)
        except BaseException:
            client.abort()
            if not client._handshake.done():
                client._handshake.cancel()  # nobody will await it any more
            raise
    return client


def _set_nodelay(client: WebSocketClient) -> None:
    transport = client._transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (tests may use other transports)


def _proxy_for(host: str, secure: bool) -> str | None:
    """The proxy URL for a websocket to ``host`` from the environment, or None (direct)."""
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get("https" if secure else "http") or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(host, proxies):  # type: ignore[attr-defined]
        return None
    return proxy


async def _proxy_tunnel(host: str, port: int, *, secure: bool, user_agent: str | None) -> socket.socket | None:
    """A TCP socket tunnelled to ``host:port`` with HTTP CONNECT, or None when no proxy applies."""
    proxy = _proxy_for(host, secure)
    if proxy is None:
        return None
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if parts.scheme != "http" or not parts.hostname:
        raise ProxyError(f"proxy {parts.scheme}://{parts.hostname}: only http:// proxies are supported")
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(parts.hostname, parts.port or 8080, type=socket.SOCK_STREAM)
    if not infos:
        raise ProxyError(f"proxy {parts.hostname} does not resolve")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if user_agent:
            lines.append(f"User-Agent: {user_agent}")
        if parts.username is not None:
            credentials = f"{parts.username}:{parts.password or ''}".encode()
            lines.append(f"Proxy-Authorization: Basic {base64.b64encode(credentials).decode()}")
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        response = b""
        while b"\r\n\r\n" not in response:  # bounded by _MAX_PROXY_RESPONSE and open_timeout
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk or len(response) > _MAX_PROXY_RESPONSE:
                raise ProxyError(f"proxy {parts.hostname} closed or sent an oversized response")
            response += chunk
        status_line = response.split(b"\r\n", 1)[0]
        status = status_line.split()
        if len(status) < 2 or status[1] != b"200":
            raise ProxyError(f"proxy {parts.hostname} refused CONNECT: {status_line.decode('latin-1')}")
    except BaseException:
        sock.close()
        raise
    return sock

