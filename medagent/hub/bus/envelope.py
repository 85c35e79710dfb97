"""What travels between hub processes over Redis, and under which names (sans-I/O).

Theory of operation
-------------------
A hub process that serves an HTTP agent operation but does not hold the agent's socket
publishes a :class:`RouteRequest` on the agent's channel, :meth:`Namespace.agent_channel`
(Medplum: ``Agent/<id>``, medplum-next-waves.md §6; ours is namespaced,
``medagent:<cluster>:agent:<id>``, so several hub clusters can share one Redis). The process
holding the socket is the one subscriber of that channel; it hands the frame to its connection
and, when the request wants an answer, publishes a :class:`RouteReply` on the requester's
``reply_to`` channel. Unlike Medplum, which subscribes one callback channel per request, each
process subscribes one inbox, :meth:`Namespace.inbox_channel`, when it starts: replies are
correlated by the envelope's ``id``, so a request costs one PUBLISH and no SUBSCRIBE round trip,
and no reply can be published before its channel is listened to.

A :class:`Taken` notice on the agent channel tells a process that still holds an older socket
of that agent that another process has taken it over (the newest connection wins, as in
:class:`~medagent.hub.registry.AgentRegistry`), so it stops taking that agent's requests at
once instead of at its next presence renewal.

The agent frame inside an envelope is the protocol's own JSON object
(:func:`medagent.cloud.messages.to_dict`), decoded on arrival with the receiver it is meant for:
requests travel towards the agent, replies towards the hub.

Invariants: ``decode_envelope(encode_envelope(e)) == e``; decoding raises
:class:`EnvelopeError` (a :class:`ValueError`) and nothing else for any input; this module does
no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from medagent.cloud.messages import AgentMessage, ProtocolError, decode_dict, dumps, to_dict

__all__ = [
    "ENVELOPE_VERSION",
    "REPLY_ERRORS",
    "Envelope",
    "EnvelopeError",
    "Namespace",
    "RouteReply",
    "RouteRequest",
    "Taken",
    "decode_envelope",
    "encode_envelope",
]

ENVELOPE_VERSION: Final = 1

#: why a holding process could not produce the agent's answer (RouteReply.error)
NOT_CONNECTED: Final = "not-connected"  #: the agent's socket is no longer here
TIMEOUT: Final = "timeout"  #: the agent did not answer in time
FAILED: Final = "failed"  #: the local delivery raised (logged on the holding process)
REPLY_ERRORS: Final = frozenset({NOT_CONNECTED, TIMEOUT, FAILED})

_CLUSTER = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class EnvelopeError(ValueError):
    """A bus message that is not a valid envelope (another program on the channel, a bad version)."""


@dataclass(frozen=True, slots=True)
class Namespace:
    """Redis channel and key names of one hub cluster (all hub processes sharing one Redis)."""

    cluster: str = "default"

    def __post_init__(self) -> None:
        if not _CLUSTER.fullmatch(self.cluster):
            raise ValueError(f"bus cluster name {self.cluster!r}: use 1-64 letters, digits, '_', '.' or '-'")

    @property
    def prefix(self) -> str:
        return f"medagent:{self.cluster}:"

    def agent_channel(self, agent_id: str) -> str:
        """Requests for ``agent_id``; subscribed by the process holding its socket."""
        return f"{self.prefix}agent:{agent_id}"

    def inbox_channel(self, process_id: str) -> str:
        """Replies for requests that ``process_id`` published."""
        return f"{self.prefix}inbox:{process_id}"

    def lease_key(self, agent_id: str) -> str:
        """String key, value = id of the process holding the socket, short TTL renewed by it."""
        return f"{self.prefix}lease:{agent_id}"

    def info_key(self, agent_id: str) -> str:
        """Hash ``{process, since, version, heartbeat}``: what ``$status`` shows, long TTL."""
        return f"{self.prefix}info:{agent_id}"


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """A frame for ``agent_id``; ``request_id``/``reply_to``/``timeout_ms`` are None for fire-and-forget."""

    agent_id: str
    message: AgentMessage
    request_id: str | None = None
    reply_to: str | None = None
    timeout_ms: int | None = None  #: relative, so clocks of hub machines need not agree

    @property
    def wants_reply(self) -> bool:
        return self.request_id is not None


@dataclass(frozen=True, slots=True)
class RouteReply:
    """The agent's answer to ``request_id`` (``message``), or why there is none (``error``)."""

    request_id: str
    message: AgentMessage | None = None
    error: str | None = None  #: one of REPLY_ERRORS when message is None


@dataclass(frozen=True, slots=True)
class Taken:
    """``agent_id``'s newest socket is now held by ``process_id``."""

    agent_id: str
    process_id: str


Envelope = RouteRequest | RouteReply | Taken


def encode_envelope(envelope: Envelope) -> bytes:
    data: dict[str, Any] = {"v": ENVELOPE_VERSION}
    if isinstance(envelope, RouteRequest):
        data.update(kind="request", agent=envelope.agent_id, frame=to_dict(envelope.message))
        if envelope.request_id is not None:
            data.update(id=envelope.request_id, replyTo=envelope.reply_to, timeoutMs=envelope.timeout_ms)
    elif isinstance(envelope, RouteReply):
        data.update(kind="reply", id=envelope.request_id)
        if envelope.message is not None:
            data["frame"] = to_dict(envelope.message)
        else:
            data["error"] = envelope.error
    else:
        data.update(kind="taken", agent=envelope.agent_id, by=envelope.process_id)
    return dumps(data)


def decode_envelope(raw: bytes | str) -> Envelope:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise EnvelopeError("not JSON") from None
    if not isinstance(data, dict):
        raise EnvelopeError("not a JSON object")
    if data.get("v") != ENVELOPE_VERSION:
        raise EnvelopeError(f"envelope version {data.get('v')!r}, expected {ENVELOPE_VERSION}")
    kind = data.get("kind")
    try:
        if kind == "request":
            return _decode_request(data)
        if kind == "reply":
            return _decode_reply(data)
        if kind == "taken":
            return Taken(_text(data, "agent"), _text(data, "by"))
    except ProtocolError as exc:
        raise EnvelopeError(f"{kind}: bad frame: {exc}") from None
    raise EnvelopeError(f"unknown envelope kind {kind!r}")


def _decode_request(data: dict[str, Any]) -> RouteRequest:
    agent_id = _text(data, "agent")
    message = decode_dict(data.get("frame"), "agent")
    if data.get("id") is None:
        return RouteRequest(agent_id, message)
    timeout_ms = data.get("timeoutMs")
    if type(timeout_ms) is not int or timeout_ms <= 0:
        raise EnvelopeError("request: timeoutMs must be a positive integer")
    return RouteRequest(agent_id, message, _text(data, "id"), _text(data, "replyTo"), timeout_ms)


def _decode_reply(data: dict[str, Any]) -> RouteReply:
    request_id = _text(data, "id")
    if "frame" in data:
        return RouteReply(request_id, decode_dict(data["frame"], "hub"))
    error = data.get("error")
    if error not in REPLY_ERRORS:
        raise EnvelopeError(f"reply: error must be one of {sorted(REPLY_ERRORS)}")
    return RouteReply(request_id, error=error)


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise EnvelopeError(f"field {key!r} must be a non-empty string")
    return value
