"""The hand-over protocol between a running agent (the *old* process) and the version it starts
(the *new* process) during an upgrade's switch. Sans-I/O: bytes in, events out; no sockets here.

Wire format
-----------
One JSON object per line (UTF-8, ``\\n``-terminated, at most :data:`MAX_LINE_BYTES`) on the control
channel (a socketpair inherited by the new process)::

    {"v": 1, "type": "ready", "pid": 4242, "version": "0.2.0"}          new -> old
    {"v": 1, "type": "go", "stoppedAt": 1764500000.12, "from": "0.1.0"}   old -> new
    {"v": 1, "type": "healthy", "pauseS": 0.41}                           new -> old
    {"v": 1, "type": "failed", "reason": "post-switch health check: ..."} either way

``ready``: the new process has built everything and holds the inherited sockets (it binds
nothing itself); ``go``: the old process stopped accepting, answered every message it received,
flushed and closed its queue (releasing the single-writer lease) and its link; ``healthy`` /
``failed``: the outcome of the new process's post-switch health check. ``failed`` from the old
process tells the new one to give up before ``go``.

Tolerance (an older or newer peer): every message carries the protocol version ``v``; a peer
with a higher ``v`` is understood as far as the known fields go (unknown fields are ignored);
a message *type* this side does not know is reported as :class:`Ignored` (a newer peer's extra
information) and does not end the hand-over. A line that is not a JSON object with an integer
``v`` and a string ``type``, a known type with a missing or mistyped field, a message out of
order, or an over-long line is :class:`Invalid`: the receiving side answers it with ``failed``
naming the problem (the old side then rolls back).

:class:`Conversation` keeps the order (``ready`` -> ``go`` -> ``healthy``|``failed``) for one
role; :func:`parse_spec` / :meth:`HandoverSpec.to_arg` carry the inherited descriptors on the
new process's command line (``--handover``).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_LINE_BYTES", "PROTOCOL_VERSION", "Conversation", "Event", "HandoverSpec", "Ignored", "Invalid",
    "Kind", "LineDecoder", "Message", "Role", "encode", "parse_spec",
]

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 64 * 1024


class Kind(enum.StrEnum):
    READY = "ready"
    GO = "go"
    HEALTHY = "healthy"
    FAILED = "failed"


class Role(enum.Enum):
    OLD = "old"  # the running agent: receives ready, sends go, receives healthy/failed
    NEW = "new"  # the started version: sends ready, receives go, sends healthy/failed


#: Required fields and their types per kind (others are optional and ignored when unknown).
_REQUIRED: Mapping[Kind, Mapping[str, type | tuple[type, ...]]] = {
    Kind.READY: {"pid": int, "version": str},
    Kind.GO: {"stoppedAt": (int, float), "from": str},
    Kind.HEALTHY: {"pauseS": (int, float)},
    Kind.FAILED: {"reason": str},
}


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    fields: Mapping[str, Any] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


@dataclass(frozen=True, slots=True)
class Invalid:
    """A line this side cannot accept; ``reason`` is what to answer in ``failed``."""

    reason: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """A well-formed message of a type this side does not know (a newer peer): skip it."""

    kind: str
    version: int


Event = Message | Invalid | Ignored


def encode(kind: Kind, **fields: Any) -> bytes:
    """One protocol line. Raises ValueError when a required field is missing or mistyped."""
    problem = _field_problem(kind, fields)
    if problem is not None:
        raise ValueError(problem)
    return json.dumps({"v": PROTOCOL_VERSION, "type": kind.value, **fields}, separators=(",", ":")).encode() + b"\n"


def decode_line(line: bytes) -> Event:
    """One line (without or with its ``\\n``) -> an event."""
    try:
        document = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return Invalid(f"not a JSON line: {line[:60]!r}")
    if not isinstance(document, dict):
        return Invalid("not a JSON object")
    version, kind = document.get("v"), document.get("type")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return Invalid("no protocol version 'v' (a positive integer)")
    if not isinstance(kind, str):
        return Invalid("no message 'type' (a string)")
    try:
        known = Kind(kind)
    except ValueError:
        return Ignored(kind, version)
    fields = {k: v for k, v in document.items() if k not in ("v", "type")}
    problem = _field_problem(known, fields)
    if problem is not None:
        return Invalid(problem)
    return Message(known, fields, version)


def _field_problem(kind: Kind, fields: Mapping[str, Any]) -> str | None:
    for name, types in _REQUIRED[kind].items():
        value = fields.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, types):
            return f"'{kind.value}' needs the field '{name}'"
    return None


class LineDecoder:
    """Bytes from the control channel -> events, one per complete line."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Event]:
        self._buffer += data
        events: list[Event] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE_BYTES:
                    self._buffer.clear()
                    events.append(Invalid(f"a line longer than {MAX_LINE_BYTES} bytes"))
                return events
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if len(line) > MAX_LINE_BYTES:
                events.append(Invalid(f"a line longer than {MAX_LINE_BYTES} bytes"))
            elif line.strip():
                events.append(decode_line(line))


#: What each role may receive / send in each phase (start -> go -> done).
_RECEIVES: Mapping[Role, Mapping[str, tuple[Kind, ...]]] = {
    Role.OLD: {"start": (Kind.READY, Kind.FAILED), "go": (Kind.HEALTHY, Kind.FAILED)},
    Role.NEW: {"start": (Kind.GO, Kind.FAILED), "go": (Kind.FAILED,)},
}
_SENDS: Mapping[Role, Mapping[str, tuple[Kind, ...]]] = {
    Role.OLD: {"start": (Kind.GO, Kind.FAILED), "go": (Kind.FAILED,)},
    Role.NEW: {"start": (Kind.READY, Kind.FAILED), "go": (Kind.HEALTHY, Kind.FAILED)},
}


class Conversation:
    """The order of one hand-over, seen from ``role``; :meth:`receive` checks what arrives,
    :meth:`sending` what this side sends. ``done`` once healthy or failed has passed."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.phase = "start"  # start -> go -> done
        self.outcome: Message | None = None

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def receive(self, event: Event) -> Event:
        """The event to act on: a Message in order, Ignored, or Invalid (also for out of order)."""
        if not isinstance(event, Message):
            return event
        expected = _RECEIVES[self.role].get(self.phase, ())
        if event.kind not in expected:
            wanted = " or ".join(k.value for k in expected) or "nothing"
            return Invalid(f"unexpected '{event.kind.value}' (waiting for {wanted})")
        self._advance(event)
        return event

    def sending(self, kind: Kind) -> None:
        """Record that this side sends ``kind``; raises RuntimeError when it is out of order."""
        if kind not in _SENDS[self.role].get(self.phase, ()):
            raise RuntimeError(f"{self.role.value} process cannot send '{kind.value}' in phase {self.phase}")
        self._advance(Message(kind, {}))

    def _advance(self, message: Message) -> None:
        if message.kind is Kind.FAILED or message.kind is Kind.HEALTHY:
            self.phase, self.outcome = "done", message
        elif message.kind is Kind.GO:
            self.phase = "go"
        # READY keeps the phase: the old side answers it with go (or failed)


@dataclass(frozen=True, slots=True)
class HandoverSpec:
    """What the new process inherits: the control channel's descriptor and, per channel name,
    the listening socket's descriptor."""

    control: int
    sockets: Mapping[str, int] = field(default_factory=dict)

    def to_arg(self) -> str:
        return json.dumps({"v": PROTOCOL_VERSION, "control": self.control, "sockets": dict(self.sockets)},
                          separators=(",", ":"))

    @property
    def fds(self) -> list[int]:
        return [self.control, *self.sockets.values()]


def parse_spec(text: str) -> HandoverSpec:
    """``--handover`` -> spec; ValueError naming what is wrong (a usage error of the CLI)."""
    try:
        document = json.loads(text)
    except ValueError:
        raise ValueError("--handover: not JSON") from None
    if not isinstance(document, dict):
        raise ValueError("--handover: not a JSON object")  # noqa: TRY004 - a usage error, like the others
    control, sockets = document.get("control"), document.get("sockets", {})
    if not isinstance(control, int) or isinstance(control, bool) or control < 0:
        raise ValueError("--handover: 'control' must be a file descriptor number")
    if not isinstance(sockets, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in sockets.items()):
        raise ValueError("--handover: 'sockets' must map channel names to file descriptor numbers")
    return HandoverSpec(control, sockets)
