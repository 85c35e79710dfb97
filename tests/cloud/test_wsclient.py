"""medagent.cloud.wsclient against a real websockets server and a real CONNECT proxy on 127.0.0.1.

Every server binds port 0 and is closed by its context manager; every wait is bounded. The last
test feeds frames built by websockets' own server protocol through random TCP chunkings.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from medagent.cloud.wsclient import ProxyError, WebSocketClient, open_websocket

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


class Peer:
    """A websockets server whose handler the test scripts through ``script``."""

    def __init__(self) -> None:
        self.received: list[str | bytes] = []
        self.script: Callable[[ServerConnection], object] | None = None
        self.port = 0
        self.user_agents: list[str | None] = []

    async def handler(self, ws: ServerConnection) -> None:
        self.user_agents.append(ws.request.headers.get("User-Agent") if ws.request else None)
        if self.script is not None:
            await self.script(ws)  # type: ignore[misc]
        async for message in ws:
            self.received.append(message)

    def refuse_bad_path(self, connection: ServerConnection, request: object) -> Response | None:
        if getattr(request, "path", "") != "/ws/agent":
            return connection.respond(403, "forbidden\n")
        return None


@contextlib.asynccontextmanager
async def peer() -> AsyncIterator[Peer]:
    p = Peer()
    async with serve(p.handler, "127.0.0.1", 0, process_request=p.refuse_bad_path, compression=None) as server:
        p.port = server.sockets[0].getsockname()[1]
        yield p


@contextlib.asynccontextmanager
async def connect(url: str, messages: list[bytes]) -> AsyncIterator[WebSocketClient]:
    client = await open_websocket(url, on_message=messages.append, open_timeout=5, close_timeout=1,
                                  user_agent="medagent/test")
    try:
        yield client
    finally:
        await client.close()


async def test_many_frames_in_one_write_arrive_in_order_as_text() -> None:
    async with peer() as p:
        async with connect(f"ws://127.0.0.1:{p.port}/ws/agent", []) as client:
            client.send_text_frames(b'{"n":%d}' % n for n in range(600))  # spans several writes
            await client.drain()
            await eventually(lambda: len(p.received) == 600)
        assert p.received == [f'{{"n":{n}}}' for n in range(600)]  # str: TEXT frames
        assert p.user_agents == ["medagent/test"]


async def test_fragments_are_joined_and_pings_answered() -> None:
    async with peer() as p:
        async def script(ws: ServerConnection) -> None:
            await ws.send(["{\"a\":", "1}"])  # one message in two fragments (RFC 6455 §5.4)
            await ws.send(b"binary too")
            pong = await ws.ping()
            await asyncio.wait_for(pong, 5)  # the sans-I/O protocol answered it
            await ws.send("after ping")

        p.script = script
        messages: list[bytes] = []
        async with connect(f"ws://127.0.0.1:{p.port}/ws/agent", messages):
            await eventually(lambda: len(messages) == 3)
        assert [bytes(x) for x in messages] == [b'{"a":1}', b"binary too", b"after ping"]


async def test_server_close_resolves_closed_with_the_code() -> None:
    async with peer() as p:
        p.script = lambda ws: ws.close(1001, "server restart")
        client = await open_websocket(f"ws://127.0.0.1:{p.port}/ws/agent", on_message=lambda _: None)
        reason = await asyncio.wait_for(client.closed, 5)
        assert "1001" in reason and "server restart" in reason
        with pytest.raises(ConnectionError):
            client.send_text_frames([b"{}"])
        await client.close()  # idempotent after the fact


async def test_client_close_and_abort() -> None:
    async with peer() as p:
        client = await open_websocket(f"ws://127.0.0.1:{p.port}/ws/agent", on_message=lambda _: None)
        await client.close()
        assert "1000" in client.closed.result()
        other = await open_websocket(f"ws://127.0.0.1:{p.port}/ws/agent", on_message=lambda _: None)
        other.abort()
        await asyncio.wait_for(other.closed, 5)


async def test_handshake_refused_and_nothing_listening() -> None:
    async with peer() as p:
        with pytest.raises(InvalidStatus):
            await open_websocket(f"ws://127.0.0.1:{p.port}/elsewhere", on_message=lambda _: None)
        port = p.port
    with pytest.raises(OSError):
        await open_websocket(f"ws://127.0.0.1:{port}/ws/agent", on_message=lambda _: None, open_timeout=5)
    with pytest.raises(ValueError):
        await open_websocket("http://127.0.0.1/ws/agent", on_message=lambda _: None)


# -- HTTP CONNECT proxy -------------------------------------------------------------------------


class ConnectProxy:
    """A minimal RFC 9110 §9.3.6 CONNECT proxy; ``status`` other than 200 refuses the tunnel."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[str] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head.decode("latin-1"))
        if self.status != 200:
            writer.write(b"HTTP/1.1 %d Nope\r\n\r\n" % self.status)
            writer.close()
            return
        host, port = head.split(b" ")[1].decode().rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@contextlib.asynccontextmanager
async def proxy(status: int = 200) -> AsyncIterator[ConnectProxy]:
    p = ConnectProxy(status)
    server = await asyncio.start_server(p.handle, "127.0.0.1", 0)
    p.port = server.sockets[0].getsockname()[1]
    try:
        yield p
    finally:
        server.close()
        await server.wait_closed()


async def test_websocket_goes_through_the_environment_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    async with peer() as p, proxy() as px:
        monkeypatch.setenv("HTTP_PROXY", f"http://user:pw@127.0.0.1:{px.port}")
        async with connect(f"ws://127.0.0.1:{p.port}/ws/agent", []) as client:
            client.send_text_frames([b'{"via":"proxy"}'])
            await eventually(lambda: p.received == ['{"via":"proxy"}'])
        [request] = px.requests
        assert request.startswith(f"CONNECT 127.0.0.1:{p.port} HTTP/1.1\r\n")
        assert "Proxy-Authorization: Basic dXNlcjpwdw==" in request  # user:pw


async def test_no_proxy_and_refusing_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    async with peer() as p, proxy(status=407) as px:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{px.port}")
        with pytest.raises(ProxyError, match="407"):
            await open_websocket(f"ws://127.0.0.1:{p.port}/ws/agent", on_message=lambda _: None)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        async with connect(f"ws://127.0.0.1:{p.port}/ws/agent", []):
            pass
        assert len(px.requests) == 1  # the NO_PROXY connection went direct
        monkeypatch.delenv("NO_PROXY")
        monkeypatch.setenv("HTTP_PROXY", "socks5://127.0.0.1:1")
        with pytest.raises(ProxyError, match="only http"):
            await open_websocket(f"ws://127.0.0.1:{p.port}/ws/agent", on_message=lambda _: None)


async def test_a_server_that_never_answers_the_handshake_times_out() -> None:
    held: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept TCP, read the upgrade request, never answer

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TimeoutError):
            await open_websocket(f"ws://127.0.0.1:{port}/ws/agent", on_message=lambda _: None, open_timeout=0.3)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


# -- random TCP chunking (hypothesis) -----------------------------------------------------------


class RecordingTransport(asyncio.Transport):
    """Stands in for the kernel socket: keeps what the client writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


MESSAGES = st.lists(st.tuples(st.sampled_from(["text", "binary", "fragmented", "ping"]),
                              st.binary(min_size=0, max_size=300)), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(messages=MESSAGES, cuts=st.lists(st.integers(1, 64), min_size=1, max_size=40))
def test_messages_survive_any_tcp_chunking(messages: list[tuple[str, bytes]], cuts: list[int]) -> None:
    from websockets.client import ClientProtocol
    from websockets.frames import Opcode
    from websockets.protocol import State
    from websockets.server import ServerProtocol
    from websockets.uri import parse_uri

    async def run() -> None:
        server = ServerProtocol(state=State.OPEN)
        expected: list[bytes] = []
        pings = 0
        for kind, payload in messages:
            if kind == "text":
                server.send_text(payload)
            elif kind == "binary":
                server.send_binary(payload)
            elif kind == "fragmented":
                half = len(payload) // 2
                server.send_text(payload[:half], fin=False)
                server.send_continuation(payload[half:], fin=True)
            else:
                server.send_ping(payload[:125])  # RFC 6455 §5.5: control payloads <= 125 bytes
                pings += 1
                continue
            expected.append(payload)
        stream = b"".join(server.data_to_send())
        received: list[bytes] = []
        client = WebSocketClient(ClientProtocol(parse_uri("ws://127.0.0.1/ws/agent"), state=State.OPEN),
                                 lambda data: received.append(bytes(data)), close_timeout=1.0)
        transport = RecordingTransport()
        client.connection_made(transport)
        position, index = 0, 0
        while position < len(stream):  # bounded: every step consumes at least one byte
            size = cuts[index % len(cuts)]
            client.data_received(stream[position : position + size])
            position, index = position + size, index + 1
        assert received == expected
        server.receive_data(bytes(transport.written))  # the client answered every ping with a pong
        pongs = [e for e in server.events_received() if getattr(e, "opcode", None) is Opcode.PONG]
        assert len(pongs) == pings

    asyncio.run(run())
