"""The channel seam: what every channel kind is, and the registry that finds one by URL scheme.

Theory of operation
-------------------
A *channel kind* (HL7 over MLLP, DICOM, ASTM, byte streams, serial ports) is a sans-I/O protocol
core in :mod:`medagent.proto` plus a thin adapter here in :mod:`medagent.channels`. The adapter
module registers one :class:`ChannelKind` per URL scheme with :func:`register_kind` when it is
imported; the runtime, the config loader and the endpoint parser only ever go through
:func:`channel_kind` / :func:`known_schemes`, so adding a kind never touches them.

Built-in kinds are imported lazily (:data:`BUILTIN_KIND_MODULES`): an HL7-only agent never
imports pynetdicom or pyserial.

The runtime builds a channel with ``kind.create(name, endpoint, options, context)``; the channel
hands every accepted unit to ``context.sink`` as an :class:`~medagent.records.InboundRecord`
(inline bytes or a file reference under ``context.data_dir``). When the kind's answer promises
durability it waits for the ``on_commit`` callback before answering the device positively.

Replies (a bot's answer to a unit) reach a channel through ``Channel.deliver_reply`` by
(remote, control id); outbound sends started by the hub reach a kind's
:class:`OutboundSender` by the remote URL's scheme (:func:`outbound_sender`), or a connected
device through ``Channel.send_to`` when the kind talks back on the device's own connection
(ASTM instruments). Nothing reaches into another object's internals.

Files payloads are delivered to the hub by the kind's :class:`FileUploader` (registered per
content type), which the runtime's dispatcher calls before it sends the unit's transmit.

Invariants every kind keeps
---------------------------
* ``start(sock)`` listens on the socket it is handed (an upgrade or reload passes listening
  sockets on without a gap), else binds its endpoint; ``listening_sockets()`` returns them
  (asyncio's socket wrappers, which have ``fileno()`` and ``getsockname()``).
* ``stop(drain_timeout)`` stops accepting, waits up to ``drain_timeout`` for units already
  handed to the sink to be answered, then closes; every timer and transport is gone after it.
* ``stats()`` returns :class:`ChannelStats`-shaped dicts (see :func:`base_stats`).
* No payload bytes in logs unless ``context.log_phi``.
"""

from __future__ import annotations

import importlib
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from medagent.records import CommitResult, DuplicatePolicy, FilePayload, InboundRecord

if TYPE_CHECKING:
    from medagent.channels.endpoint import Endpoint

__all__ = [
    "BUILTIN_KIND_MODULES",
    "Channel",
    "ChannelContext",
    "ChannelKind",
    "FileUploader",
    "HubClient",
    "InboundSink",
    "OutboundReply",
    "OutboundSender",
    "UnknownChannelKind",
    "base_stats",
    "channel_kind",
    "file_uploader",
    "known_schemes",
    "outbound_sender",
    "register_file_uploader",
    "register_kind",
    "register_outbound_sender",
]


class InboundSink(Protocol):
    """Where a channel hands accepted units (implemented by the agent runtime).

    durable=True: submit to the durable queue and call `on_commit` on the loop thread after the
    commit. durable=False (immediate answers): forward from memory; `on_commit` is None.
    """

    def accept(
        self,
        record: InboundRecord,
        *,
        durable: bool,
        dedup: DuplicatePolicy,
        on_commit: Callable[[CommitResult], None] | None,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class ChannelContext:
    """What the runtime gives every channel it builds.

    ``data_dir`` is the agent's data directory (0700); kinds that spool payloads to files write
    them below ``data_dir / "spool" / <channel name>`` and reference them relative to ``data_dir``.
    ``hub`` lets a kind that answers from the hub's data (DICOM C-FIND/C-GET/C-MOVE) reach it.
    ``durability`` is the agent's queue durability (``normal`` or ``fsync``): kinds that spool
    files fsync them when it is ``fsync``, so a file is as durable as the row naming it.
    """

    sink: InboundSink
    data_dir: Path
    log_phi: bool = False
    hub: HubClient | None = None
    durability: str = "normal"

    def spool_dir(self, channel: str) -> Path:
        return self.data_dir / "spool" / channel


@runtime_checkable
class Channel(Protocol):
    """A running channel (one per ``[[channel]]`` / Endpoint)."""

    name: str
    endpoint: Endpoint

    @property
    def kind(self) -> str:
        """The URL scheme it was built for (``mllp``, ``dicom``, ...)."""

    @property
    def wants_replies(self) -> bool:
        """True when a bot's reply to a unit goes back to the device (HL7 original/two-phase)."""

    @property
    def encoding(self) -> str:
        """Text encoding of bodies on the websocket (HL7: the channel's encoding)."""

    async def start(self, sock: socket.socket | None = None) -> None: ...

    async def stop(self, drain_timeout: float = 5.0) -> None: ...

    def listening_sockets(self) -> list[Any]:
        """The listening sockets (asyncio's socket wrappers: ``fileno()``, ``getsockname()``);
        empty for kinds that do not listen (serial ports)."""

    def deliver_reply(self, remote: str, control_id: str, body: str, status_code: int = 200) -> bool: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ChannelKind:
    """One channel kind, registered by URL scheme.

    ``parameters`` are the accepted query parameter names (anything else is a config error with
    a "did you mean" hint); ``parse_options(endpoint)`` builds the kind's frozen typed options
    and raises :class:`~medagent.channels.endpoint.EndpointError` naming the URL and parameter;
    ``create(name, endpoint, options, context)`` builds an unstarted :class:`Channel`.
    ``needs_port`` is False for kinds addressed by a device path (``serial:///dev/ttyUSB0``).
    """

    scheme: str
    parameters: tuple[str, ...]
    parse_options: Callable[[Endpoint], Any]
    create: Callable[[str, Endpoint, Any, ChannelContext], Channel]
    description: str = ""
    needs_port: bool = True


class UnknownChannelKind(LookupError):
    def __init__(self, scheme: str) -> None:
        super().__init__(f"unknown channel kind {scheme!r}; known: {', '.join(known_schemes())}")
        self.scheme = scheme


#: Modules that register the built-in kinds when imported (scheme -> module).
BUILTIN_KIND_MODULES: Mapping[str, str] = {
    "mllp": "medagent.channels.hl7",
    "mllps": "medagent.channels.hl7",
    "dicom": "medagent.channels.dicom",
    "astm": "medagent.channels.astm",
    "astm+serial": "medagent.channels.astm",
    "tcp": "medagent.channels.bytestream",
    "serial": "medagent.channels.bytestream",
}

_KINDS: dict[str, ChannelKind] = {}


def register_kind(kind: ChannelKind) -> ChannelKind:
    """Register (or replace, for tests and plug-ins) the kind for ``kind.scheme``."""
    _KINDS[kind.scheme] = kind
    return kind


def known_schemes() -> list[str]:
    return sorted(set(_KINDS) | set(BUILTIN_KIND_MODULES))


def channel_kind(scheme: str) -> ChannelKind:
    """The kind registered for ``scheme``, importing its built-in module on first use."""
    kind = _KINDS.get(scheme)
    if kind is None and scheme in BUILTIN_KIND_MODULES:
        importlib.import_module(BUILTIN_KIND_MODULES[scheme])
        kind = _KINDS.get(scheme)
    if kind is None:
        raise UnknownChannelKind(scheme)
    return kind


# --------------------------------------------------------------------------- outbound


@dataclass(frozen=True, slots=True)
class OutboundReply:
    """What a device answered to an outbound send (the hub's ``$push`` result)."""

    body: str
    content_type: str
    status_code: int = 200


class OutboundSender(Protocol):
    """Sends hub-initiated messages to a remote named by URL (``mllp://``, ``dicom://AE@h:p``, ...).

    Raises ``OutboundError`` (any ``Exception`` subclass whose text is the reason) on failure;
    the runtime answers the hub with status 400 and that text.
    """

    async def send(self, remote: str, body: str, content_type: str, *, return_ack: str | None = None,
                   timeout: float | None = None) -> OutboundReply: ...

    async def close(self) -> None: ...


#: scheme -> factory building the runtime's one sender for that scheme (keyword options from
#: the Agent's settings, e.g. keepAlive / maxClientsPerRemote for MLLP).
_OUTBOUND: dict[str, Callable[..., OutboundSender]] = {}


def register_outbound_sender(scheme: str, factory: Callable[..., OutboundSender]) -> None:
    _OUTBOUND[scheme] = factory


def outbound_sender(scheme: str) -> Callable[..., OutboundSender]:
    if scheme not in _OUTBOUND and scheme in BUILTIN_KIND_MODULES:
        importlib.import_module(BUILTIN_KIND_MODULES[scheme])
    try:
        return _OUTBOUND[scheme]
    except KeyError:
        raise UnknownChannelKind(scheme) from None


# --------------------------------------------------------------------------- file payloads


class HubClient(Protocol):
    """An authenticated HTTP view of the hub for uploads and queries (built by the runtime)."""

    @property
    def base_url(self) -> str: ...

    @property
    def ssl_context(self) -> ssl.SSLContext | None: ...

    async def authorization(self) -> str:
        """The ``Authorization`` header value (``Bearer <access token>``), refreshed as needed."""


class FileUploader(Protocol):
    """Delivers a file payload to the hub before its transmit is sent.

    Registered under the *row's* content type (e.g. ``application/dicom``). Called by the
    dispatcher with the absolute file path and the record's metadata body; returns the body and
    content type to send in the transmit (e.g. Medplum's DICOM JSON document, with the hub's
    retrieve URL added, as ``application/json``). Must be idempotent: after a crash the same
    file may be uploaded again (the hub dedups). Raises on failure; the row stays pending and is
    retried with backoff.
    """

    async def __call__(self, hub: HubClient, path: Path, payload: FilePayload, body: bytes) -> tuple[bytes, str]: ...


_UPLOADERS: dict[str, FileUploader] = {}


def register_file_uploader(content_type: str, uploader: FileUploader) -> None:
    _UPLOADERS[content_type] = uploader


def file_uploader(content_type: str) -> FileUploader | None:
    return _UPLOADERS.get(content_type)


# --------------------------------------------------------------------------- stats


@dataclass(slots=True)
class ChannelStats:
    """The one stats shape every kind reports (plus kind-specific extras).

    ``answers`` counts answers by code (HL7 AA/AE/AR/CA/CE/CR, DICOM status hex, ASTM ACK/NAK);
    ``latency_ms`` is a histogram of accept -> answer latency in these upper bounds (ms).
    """

    connections_open: int = 0
    connections_total: int = 0
    units_in: int = 0
    units_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: int = 0
    answers: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, int] = field(default_factory=dict)


LATENCY_BUCKETS_MS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 50, 100, 500, 1000, 5000, float("inf"))


def base_stats(kind: str, stats: ChannelStats, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A channel's stats dict in the shared shape: ``{"kind", "connectionsOpen", ...}`` + extras."""
    out: dict[str, Any] = {
        "kind": kind,
        "connectionsOpen": stats.connections_open,
        "connectionsTotal": stats.connections_total,
        "unitsIn": stats.units_in,
        "unitsOut": stats.units_out,
        "bytesIn": stats.bytes_in,
        "bytesOut": stats.bytes_out,
        "errors": stats.errors,
        "answers": dict(stats.answers),
        "latencyMs": dict(stats.latency_ms),
    }
    if extra:
        out.update(extra)
    return out


def observe_latency(stats: ChannelStats, millis: float) -> None:
    """Count one accept -> answer latency in the histogram."""
    for bound in LATENCY_BUCKETS_MS:
        if millis <= bound:
            key = "+Inf" if bound == float("inf") else f"{bound:g}"
            stats.latency_ms[key] = stats.latency_ms.get(key, 0) + 1
            return
