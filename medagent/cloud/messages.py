"""Typed messages of the Medplum Agent websocket protocol, plus medagent's batching extension.

Theory of operation
-------------------
Every websocket frame is one JSON object with a ``type`` and an optional ``callback`` (the
correlation id; see shared/medplum-protocol.md §0 and §2). Each message type is a slotted,
hashable dataclass, immutable by convention (not ``frozen``: see AgentMessage), whose Python
attributes are snake_case; :data:`JSON_NAMES` maps them to the exact camelCase names of the spec (``accessToken``, ``agentId``, ``contentType``, ``statusCode``,
``returnAck``). ``encode()`` omits attributes that are ``None`` (the Node agent omits undefined
keys the same way) and returns UTF-8 JSON bytes for a *text* frame. ``decode()`` validates the
type and the field types and raises :class:`ProtocolError` — never anything else — for a frame
that is not JSON, not an object, lacks a required field or has a wrong type. An unknown ``type``
raises :class:`UnknownMessageType`, which carries the frame's callback so the receiver can
answer ``agent:error "Unknown message type: <t>"`` as the Medplum agent does. Unknown *fields*
are ignored: newer Medplum versions add fields, and a drop-in must not break on them.

Legacy aliases (medplum-protocol.md §2): ``connected`` is a connect response; ``push`` is a
transmit request; ``transmit`` is a transmit request when the hub receives it and a transmit
response when the agent receives it, so :func:`decode` takes ``receiver``.

Batching extension (medagent only)
----------------------------------
A medagent hub advertises ``features: {"batch": {"maxMessages": N, "maxBytes": B}}`` in its
``agent:connect:response``; Medplum never sends ``features`` and the Node agent ignores it, so
both sides stay compatible. Only after seeing the advertisement may the agent send
``{"type": "agent:batch", "seq": n, "messages": [...]}`` frames holding several transmit
requests. The hub stores every message of a batch, then confirms cumulatively with
``{"type": "agent:batch:ack", "seq": n}`` meaning "every batch with seq <= n of this connection
is stored". Either side may also wrap transmit *responses* in ``agent:batch`` (no ack needed for
those; their callbacks are their confirmation). ``seq`` restarts at 1 on each connection.
Inside a batch a transmit request may carry ``duplicateOf`` (the agent's queue saw the same
control id before) and ``noReply: true`` (no device waits for the bot's reply).

This module is the package's one encoder. Besides :func:`encode` / :func:`to_dict` it has the two
hot-path helpers the agent's session core uses: :func:`encode_transmit` (a transmit request with
the current ``accessToken`` filled in at send time, as the Medplum agent does in
``sendToWebSocket``, §1.1, and the medagent extension fields kept only towards a hub that
advertised them) and :func:`batch_frame` (already encoded messages joined into one
``agent:batch`` frame without decoding them again). A str that JSON cannot carry (a lone
surrogate) is encoded with U+FFFD in its place rather than failing the frame.

Invariants: ``decode(encode(m), receiver) == m`` for every message ``m`` whose direction reaches
that receiver; ``encode`` output never contains keys whose value is ``None``; a transmit request
encoded without extensions never carries ``duplicateOf`` or ``noReply``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import orjson

__all__ = [
    "CONTENT_TYPE_HL7_V2",
    "CONTENT_TYPE_PING",
    "CONTENT_TYPE_TEXT",
    "CONTENT_TYPE_JSON",
    "CONTENT_TYPE_FHIR_JSON",
    "CONTENT_TYPE_OCTET_STREAM",
    "ProtocolError",
    "UnknownMessageType",
    "AgentMessage",
    "ConnectRequest",
    "ConnectResponse",
    "HeartbeatRequest",
    "HeartbeatResponse",
    "TransmitRequest",
    "TransmitResponse",
    "ReloadConfigRequest",
    "ReloadConfigResponse",
    "UpgradeRequest",
    "UpgradeResponse",
    "LogsRequest",
    "LogsResponse",
    "StatsRequest",
    "StatsResponse",
    "ErrorMessage",
    "Batch",
    "BatchAck",
    "MESSAGE_TYPES",
    "encode",
    "encode_transmit",
    "batch_frame",
    "BATCH_FRAME_OVERHEAD",
    "dumps",
    "to_dict",
    "decode",
    "decode_dict",
    "new_callback",
    "Receiver",
]

log = logging.getLogger(__name__)

CONTENT_TYPE_HL7_V2 = "x-application/hl7-v2+er7"
CONTENT_TYPE_PING = "x-application/ping"
CONTENT_TYPE_TEXT = "text/plain"
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_FHIR_JSON = "application/fhir+json"
CONTENT_TYPE_OCTET_STREAM = "application/octet-stream"

Receiver = Literal["agent", "hub"]

#: Python attribute -> JSON key, where they differ.
JSON_NAMES: dict[str, str] = {
    "access_token": "accessToken",
    "agent_id": "agentId",
    "content_type": "contentType",
    "status_code": "statusCode",
    "return_ack": "returnAck",
    "duplicate_of": "duplicateOf",
    "no_reply": "noReply",
}


class ProtocolError(ValueError):
    """A frame that is not a valid protocol message. ``callback`` is set when it could be read."""

    def __init__(self, message: str, callback: str | None = None) -> None:
        super().__init__(message)
        self.callback = callback


class UnknownMessageType(ProtocolError):
    """A well-formed frame whose ``type`` this side does not know."""

    def __init__(self, message_type: str, callback: str | None = None) -> None:
        super().__init__(f"Unknown message type: {message_type}", callback)
        self.message_type = message_type


def new_callback(agent_id: str) -> str:
    """A correlation id in Medplum's format: ``Agent/<agentId>-<uuid4>``."""
    return f"Agent/{agent_id}-{uuid.uuid4()}"


# Not frozen: frozen construction costs ~3 us per message against ~0.6 (one TransmitRequest per
# row on the agent, one TransmitResponse per reply); immutable by convention (never assigned).
@dataclass(slots=True, unsafe_hash=True)
class AgentMessage:
    """Base of every message; ``TYPE`` is the wire ``type``."""

    TYPE: ClassVar[str] = ""


@dataclass(slots=True, unsafe_hash=True)
class ConnectRequest(AgentMessage):
    TYPE: ClassVar[str] = "agent:connect:request"
    access_token: str
    agent_id: str
    callback: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class ConnectResponse(AgentMessage):
    TYPE: ClassVar[str] = "agent:connect:response"
    callback: str | None = None
    #: medagent extension: what the hub supports, e.g. {"batch": {"maxMessages": 1000}}.
    features: dict[str, Any] | None = None


@dataclass(slots=True, unsafe_hash=True)
class HeartbeatRequest(AgentMessage):
    TYPE: ClassVar[str] = "agent:heartbeat:request"
    access_token: str | None = None
    callback: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class HeartbeatResponse(AgentMessage):
    TYPE: ClassVar[str] = "agent:heartbeat:response"
    version: str
    callback: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class TransmitRequest(AgentMessage):
    """A→S: a device message for the channel's bot. S→A: send ``body`` to ``remote``."""

    TYPE: ClassVar[str] = "agent:transmit:request"
    remote: str
    content_type: str
    body: str
    channel: str | None = None
    callback: str | None = None
    access_token: str | None = None
    return_ack: str | None = None  # "first" | "application" (outbound only)
    #: medagent extension, sent only inside agent:batch: the agent's queue saw this
    #: (channel, sender, MSH-10) before; the value is the earlier row's callback.
    duplicate_of: str | None = None
    #: medagent extension, sent only inside agent:batch: no device waits for the bot's reply
    #: (fast/immediate ACK modes), so the hub runs the bot and records its reply but does not
    #: send it back; the batch ack is the confirmation.
    no_reply: bool | None = None


@dataclass(slots=True, unsafe_hash=True)
class TransmitResponse(AgentMessage):
    TYPE: ClassVar[str] = "agent:transmit:response"
    remote: str
    content_type: str
    body: str
    channel: str | None = None
    callback: str | None = None
    status_code: int | None = None


@dataclass(slots=True, unsafe_hash=True)
class ReloadConfigRequest(AgentMessage):
    TYPE: ClassVar[str] = "agent:reloadconfig:request"
    callback: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class ReloadConfigResponse(AgentMessage):
    TYPE: ClassVar[str] = "agent:reloadconfig:response"
    status_code: int
    callback: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class UpgradeRequest(AgentMessage):
    TYPE: ClassVar[str] = "agent:upgrade:request"
    version: str | None = None
    force: bool | None = None
    callback: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class UpgradeResponse(AgentMessage):
    TYPE: ClassVar[str] = "agent:upgrade:response"
    status_code: int
    callback: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class LogsRequest(AgentMessage):
    TYPE: ClassVar[str] = "agent:logs:request"
    limit: int | None = None
    callback: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class LogsResponse(AgentMessage):
    TYPE: ClassVar[str] = "agent:logs:response"
    status_code: int
    logs: list[dict[str, Any]]
    callback: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class StatsRequest(AgentMessage):
    TYPE: ClassVar[str] = "agent:stats:request"
    callback: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class StatsResponse(AgentMessage):
    TYPE: ClassVar[str] = "agent:stats:response"
    status_code: int
    stats: dict[str, Any]
    callback: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class ErrorMessage(AgentMessage):
    TYPE: ClassVar[str] = "agent:error"
    body: str
    callback: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class Batch(AgentMessage):
    """medagent extension: several messages in one frame (see module docstring)."""

    TYPE: ClassVar[str] = "agent:batch"
    messages: tuple[AgentMessage, ...]
    seq: int | None = None


@dataclass(slots=True, unsafe_hash=True)
class BatchAck(AgentMessage):
    """medagent extension: every ``agent:batch`` with seq <= ``seq`` on this connection is stored."""

    TYPE: ClassVar[str] = "agent:batch:ack"
    seq: int


MESSAGE_TYPES: dict[str, type[AgentMessage]] = {
    cls.TYPE: cls
    for cls in (
        ConnectRequest,
        ConnectResponse,
        HeartbeatRequest,
        HeartbeatResponse,
        TransmitRequest,
        TransmitResponse,
        ReloadConfigRequest,
        ReloadConfigResponse,
        UpgradeRequest,
        UpgradeResponse,
        LogsRequest,
        LogsResponse,
        StatsRequest,
        StatsResponse,
        ErrorMessage,
        Batch,
        BatchAck,
    )
}

_ALIASES: dict[Receiver, dict[str, type[AgentMessage]]] = {
    "agent": {"connected": ConnectResponse, "push": TransmitRequest, "transmit": TransmitResponse},
    "hub": {"transmit": TransmitRequest},
}


#: How a field's value is checked and encoded (resolved once per field, not per message).
_PLAIN, _INT, _NESTED = 0, 1, 2

_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "dict[str, Any]": (dict,),
    "list[dict[str, Any]]": (list,),
}

#: One field of a message class: (attribute, JSON key, accepted types, required, check). Plain
#: tuples: to_dict and decode_dict run once per message on both sides, and tuple unpacking is
#: cheaper than attribute reads.
_FieldSpec = tuple[str, str, tuple[type, ...], bool, int]


def _field_specs(cls: type[AgentMessage]) -> tuple[_FieldSpec, ...]:
    specs = []
    for f in dataclasses.fields(cls):
        annotation = str(f.type)
        optional = annotation.endswith(" | None")
        types = _SIMPLE_TYPES.get(annotation.removesuffix(" | None"), (object,))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        check = _NESTED if f.name == "messages" else _INT if types == (int,) else _PLAIN
        specs.append((f.name, JSON_NAMES.get(f.name, f.name), types, required and not optional, check))
    return tuple(specs)


_SPECS: dict[type[AgentMessage], tuple[_FieldSpec, ...]] = {cls: _field_specs(cls) for cls in MESSAGE_TYPES.values()}


def transmit_dict(
    message: TransmitRequest, access_token: str | None = None, extensions: bool = True
) -> dict[str, Any]:
    """The JSON object of a transmit request; the one place its keys are written.

    ``access_token`` (when given) replaces the message's own; ``extensions=False`` leaves out
    medagent's ``duplicateOf`` and ``noReply``, which only a hub that advertised batching knows.
    """
    data: dict[str, Any] = {
        "type": "agent:transmit:request",
        "remote": message.remote,
        "contentType": message.content_type,
        "body": message.body,
    }
    if message.channel is not None:
        data["channel"] = message.channel
    if message.callback is not None:
        data["callback"] = message.callback
    token = access_token if access_token is not None else message.access_token
    if token is not None:
        data["accessToken"] = token
    if message.return_ack is not None:
        data["returnAck"] = message.return_ack
    if extensions:
        if message.duplicate_of is not None:
            data["duplicateOf"] = message.duplicate_of
        if message.no_reply is not None:
            data["noReply"] = message.no_reply
    return data


def encode_transmit(message: TransmitRequest, access_token: str | None, extensions: bool) -> bytes:
    """One transmit request as JSON bytes (see :func:`transmit_dict`)."""
    return dumps(transmit_dict(message, access_token, extensions))


#: Bytes of ``{"type":"agent:batch","seq":N,"messages":[]}`` around the joined messages (N < 10**20).
BATCH_FRAME_OVERHEAD = 64


def batch_frame(seq: int, encoded: list[bytes]) -> bytes:
    """An ``agent:batch`` frame from already encoded messages (same JSON as :func:`encode`)."""
    return b'{"type":"agent:batch","seq":%d,"messages":[%b]}' % (seq, b",".join(encoded))


def to_dict(message: AgentMessage) -> dict[str, Any]:
    """The JSON object of a message (``None`` attributes omitted)."""
    if type(message) is TransmitRequest:
        return transmit_dict(message)
    out: dict[str, Any] = {"type": message.TYPE}
    for attr, key, _types, _required, check in _SPECS[type(message)]:
        value = getattr(message, attr)
        if value is None:
            continue
        if check == _NESTED:
            value = [to_dict(m) for m in value]
        out[key] = value
    return out


def encode(message: AgentMessage) -> bytes:
    """UTF-8 JSON for one websocket *text* frame."""
    return dumps(to_dict(message))


def dumps(data: dict[str, Any]) -> bytes:
    """orjson, with lone surrogates (invalid in UTF-8 and JSON) replaced by U+FFFD if present."""
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        # why: a device's bytes decoded with surrogateescape must not stall the link forever
        log.warning("a %s frame had characters JSON cannot carry; replaced with U+FFFD", data.get("type"))
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


def decode(frame: str | bytes | bytearray | memoryview, receiver: Receiver) -> AgentMessage:
    """Parse one frame received by ``receiver``; raises :class:`ProtocolError` on anything invalid."""
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    return decode_dict(data, receiver)


def decode_dict(data: Any, receiver: Receiver) -> AgentMessage:
    """Like :func:`decode` for an already parsed JSON value."""
    if not isinstance(data, dict):
        raise ProtocolError(f"a message must be a JSON object, not {type(data).__name__}")
    callback = data.get("callback")
    if callback is not None and not isinstance(callback, str):
        raise ProtocolError("field 'callback' must be a string")
    message_type = data.get("type")
    if not isinstance(message_type, str):
        raise ProtocolError("missing or non-string field 'type'", callback)
    cls = _ALIASES[receiver].get(message_type) or MESSAGE_TYPES.get(message_type)
    if cls is None:
        raise UnknownMessageType(message_type, callback)
    kwargs: dict[str, Any] = {}
    get = data.get
    for attr, key, types, required, check in _SPECS[cls]:
        value = get(key)
        if value is None:
            if required:
                raise ProtocolError(f"{cls.TYPE}: missing field '{key}'", callback)
            continue
        if check == _NESTED:
            value = _decode_batch_items(value, receiver, callback)
        elif not isinstance(value, types) or (check == _INT and isinstance(value, bool)):
            raise ProtocolError(f"{cls.TYPE}: field '{key}' has the wrong type", callback)
        kwargs[attr] = value
    return cls(**kwargs)


def _decode_batch_items(value: Any, receiver: Receiver, callback: str | None) -> tuple[AgentMessage, ...]:
    if not isinstance(value, list):
        raise ProtocolError("agent:batch: field 'messages' must be a list", callback)
    items = tuple(decode_dict(item, receiver) for item in value)
    if any(isinstance(item, Batch) for item in items):
        raise ProtocolError("agent:batch: batches may not be nested", callback)
    return items

