"""Shared listener pieces: opening the listening server (plain or TLS), and who gets a slot.

Theory of operation
-------------------
:func:`listen` opens a channel's server on host:port or on a handed-over socket, with TLS when
the channel has a :class:`~medagent.channels.tls.ServerTls` (one place for every kind, so TLS
options, the handshake timeout and the error text are the same everywhere).
:class:`TlsTcpListener` is the ASTM/byte-stream ``TcpListener`` with that TLS and the client
certificate allow-list (slot eviction below is MLLP's for now: stream_listener.TcpListener
still refuses when full).

Idle-connection eviction and the per-address limit (defect 3):
A listener keeps its open connections in a dict keyed by remote ("host:port"). When a new
connection arrives, :meth:`Admission.make_room` decides, before the listener registers it:

1. Over ``maxConnectionsPerAddress`` (when set) connections from the same host: refused.
2. Below ``maxConnections``: admitted.
3. Full: the connection that has been idle longest *without ever sending a message* (and so
   with no ACK outstanding and no partial frame) is evicted: removed from the dict at once and
   aborted, and the new one is admitted. When every connection has sent traffic the new one is
   refused: a real sender is never dropped for a newcomer.

MLLP connections that send nothing at all are also closed after ``firstMessageTimeoutMs``
(default 30 s), so idle sockets free their slots even without pressure. Evictions, refusals
and silent closes are logged once per *episode* (:class:`Episode`: the first event after a quiet
minute logs one line; the next line carries the count since).

Invariants
----------
* Never evicts a connection that sent a message, has a partial frame or awaits an ACK.
* After make_room admits, the dict has room for one more connection.
* Logging is bounded: at most one line per kind of event per minute per listener.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Final, Protocol, TypeVar

from medagent.channels.stream_listener import TcpLine, TcpListener
from medagent.channels.tls import HANDSHAKE_TIMEOUT_S, ServerTls

__all__ = ["Admission", "Episode", "Evictable", "TlsTcpListener", "listen", "remote_host"]

logger = logging.getLogger(__name__)

#: An episode ends after this many quiet seconds; the next event logs again.
EPISODE_QUIET_S: Final = 60.0


class Evictable(Protocol):
    remote: str

    @property
    def evictable(self) -> bool:
        """True while the connection never sent a message and nothing of it is pending."""
        ...

    @property
    def idle_since(self) -> float:
        """Loop time of its last activity (its connect time when it never sent anything)."""
        ...

    def evict(self) -> None:
        """Abort the connection (it is already out of the listener's dict)."""
        ...


def remote_host(remote: str) -> str:
    """The host part of "host:port" (IPv6 hosts keep their colons)."""
    return remote.rsplit(":", 1)[0] if ":" in remote else remote


_C = TypeVar("_C", bound=Evictable)


class Episode:
    """Logs the first event of a burst, then the count, at most once per quiet minute."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.total = 0
        self._unlogged = 0
        self._last_log = -EPISODE_QUIET_S

    def note(self, detail: str, level: int = logging.WARNING) -> None:
        self.total += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= EPISODE_QUIET_S:
            more = f" ({self._unlogged - 1} more since the last line)" if self._unlogged > 1 else ""
            logger.log(level, "%s: %s%s; logged once per minute while it lasts", self.what, detail, more)
            self._last_log = now
            self._unlogged = 0


class Admission:
    """One listener's slot policy; see the module docstring."""

    def __init__(self, what: str, max_connections: int, max_per_address: int = 0) -> None:
        self.what = what
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.evictions = Episode(what)
        self.refusals = Episode(what)
        self.silent_closes = Episode(what)

    def make_room(self, connections: MutableMapping[str, _C], remote: str) -> str | None:
        """None when `remote` may be registered (evicting one idle connection if needed), else why not."""
        if self.max_per_address:
            host = remote_host(remote)
            same = sum(1 for key in connections if remote_host(key) == host)
            if same >= self.max_per_address:
                self.refusals.note(f"refused connection from {remote} "
                                   f"(maxConnectionsPerAddress={self.max_per_address} reached)")
                return f"maxConnectionsPerAddress={self.max_per_address} reached"
        if len(connections) < self.max_connections or self.evict_one(connections, remote):
            return None
        self.refusals.note(f"refused connection from {remote} (maxConnections={self.max_connections} "
                           "reached and every connection has sent messages)")
        return f"maxConnections={self.max_connections} reached"

    def evict_one(self, connections: MutableMapping[str, _C], remote: str) -> bool:
        """Close the longest-idle evictable connection to admit `remote`; False when there is none."""
        victim: _C | None = None
        for connection in connections.values():
            if connection.evictable and (victim is None or connection.idle_since < victim.idle_since):
                victim = connection
        if victim is None:
            return False
        del connections[victim.remote]
        victim.evict()
        self.evictions.note(f"full (maxConnections={self.max_connections}): closed idle connection "
                            f"{victim.remote} that never sent a message to admit {remote}")
        return True

    def silent_close(self, remote: str, timeout_s: float) -> None:
        self.silent_closes.note(f"closed connection from {remote}: nothing received within "
                                f"{timeout_s:g} s of connecting (firstMessageTimeoutMs)", logging.INFO)


async def listen(what: str, factory: Callable[[], asyncio.BaseProtocol], host: str, port: int,
                 sock: socket.socket | None, tls: ServerTls | None, backlog: int = 100) -> asyncio.Server:
    """Open `what`'s server on `sock` (handed over) or host:port, with TLS when `tls` is given."""
    loop = asyncio.get_running_loop()
    extra: dict[str, Any] = {} if tls is None else {
        "ssl": tls.server_context, "ssl_handshake_timeout": HANDSHAKE_TIMEOUT_S}
    try:
        if sock is not None:
            return await loop.create_server(factory, sock=sock, backlog=backlog, **extra)
        return await loop.create_server(factory, host, port, backlog=backlog, **extra)
    except OSError as exc:
        where = "the handed-over socket" if sock is not None else f"{host}:{port}"
        raise OSError(exc.errno, f"{what}: cannot listen on {where}: {exc.strerror or exc}") from exc


class TlsTcpListener(TcpListener):
    """The ASTM/byte-stream :class:`TcpListener` with TLS (when given a ServerTls) and the client
    allow-list."""

    def __init__(self, *args: Any, tls: ServerTls | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls = tls

    async def start(self, sock: socket.socket | None = None) -> None:
        what = f"{self.kind} channel {self.channel}"
        self._server = await listen(what, lambda: TcpLine(self), self.host, self.port, sock, self.tls)
        name = self._server.sockets[0].getsockname()
        self.host, self.port = name[0], int(name[1])
        logger.debug("%s listening on %s:%d%s", what, self.host, self.port, "" if self.tls is None else " (TLS)")

    def admit(self, line: TcpLine) -> bool:
        refusal = self.tls.refusal(line.transport) if self.tls is not None else None
        if refusal is not None:
            self.connections_refused += 1
            logger.warning("%s channel %s: refused connection from %s: %s", self.kind, self.channel,
                           line.remote, refusal)
            return False
        return super().admit(line)
