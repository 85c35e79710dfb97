"""A TCP proxy on 127.0.0.1 that can stall, drop or half-close every connection through it.

Theory of operation
-------------------
`FaultProxy` listens on port 0 and forwards each accepted connection to a fixed upstream
(`upstream_port`), one asyncio task per direction, on its own event loop in a thread (the fault
tests themselves are blocking: they drive processes and sockets). `outage(mode)` breaks the link
until `restore()`:

* ``stall``: nothing is forwarded in either direction and nothing is read past one buffer, so
  TCP back-pressure builds up (a frozen NAT, a hung firewall); new connections are accepted and
  held silent. `restore()` lets the held bytes flow again.
* ``drop``: every connection is reset (RST, SO_LINGER 0), new ones are reset on accept.
* ``half-close``: every connection gets a FIN towards both ends (write_eof) and whatever
  arrives is discarded; new ones get the same. The peers see a clean end of stream in one
  direction and a socket still open in the other.

Invariants: the proxy never changes or reorders bytes it forwards; `close()` stops the loop,
the listener and every connection; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Literal

Mode = Literal["stall", "drop", "half-close"]
_BUFFER = 64 * 1024


class _Link:
    """One proxied connection: the two stream pairs and the tasks pumping between them."""

    def __init__(self, proxy: FaultProxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        self.writers = (client[1], upstream[1])
        self.tasks = [asyncio.ensure_future(self._pump(client[0], upstream[1])),
                      asyncio.ensure_future(self._pump(upstream[0], client[1]))]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self.proxy.flowing.wait()
                data = await reader.read(_BUFFER)
                if not data:
                    break
                await self.proxy.flowing.wait()  # a stall holds this chunk back
                if self.proxy.discarding:
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.reset() if self.proxy.resetting else self.close_write(writer)

    @staticmethod
    def close_write(writer: asyncio.StreamWriter) -> None:
        try:
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass

    def half_close(self) -> None:
        for writer in self.writers:
            self.close_write(writer)

    def reset(self) -> None:
        for writer in self.writers:
            sock = writer.get_extra_info("socket")
            if sock is not None and not writer.is_closing():
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.loop = asyncio.new_event_loop()
        self.links: set[_Link] = set()
        self.accepted = 0
        self.mode: Mode | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fault-proxy")
        self._thread.start()
        assert self._ready.wait(10), "proxy did not start"

    # -- the proxy's loop ------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def discarding(self) -> bool:
        return self.mode == "half-close"

    @property
    def resetting(self) -> bool:
        return self.mode == "drop"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.upstream_port), 10)
        except (TimeoutError, OSError):
            writer.transport.abort()
            return
        link = _Link(self, (reader, writer), upstream)
        self.links.add(link)
        if self.mode == "drop":
            link.reset()
        elif self.mode == "half-close":
            link.half_close()
        await asyncio.gather(*link.tasks, return_exceptions=True)
        self.links.discard(link)
        for w in link.writers:
            w.transport.abort()

    def _set_mode(self, mode: Mode | None) -> None:
        self.mode = mode
        if mode == "stall":
            self.flowing.clear()
            return
        self.flowing.set()
        for link in list(self.links):
            if mode == "drop":
                link.reset()
            elif mode == "half-close":
                link.half_close()

    # -- the test's side -------------------------------------------------------------------

    def _call(self, function, *args) -> None:  # type: ignore[no-untyped-def]
        done = threading.Event()

        def run() -> None:
            try:
                function(*args)
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(10), "proxy loop did not answer"

    def outage(self, mode: Mode) -> None:
        self._call(self._set_mode, mode)

    def restore(self) -> None:
        self._call(self._set_mode, None)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for link in list(self.links):
                link.reset()
            await asyncio.sleep(0)

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
