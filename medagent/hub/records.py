"""Records the hub store reads and writes: agents, channels, bots, messages, resources.

Every record is a slotted dataclass, frozen except the four made once per message on the intake
path (IncomingMessage, StoredReply, IntakeResult, MessageResult): a frozen dataclass assigns each
field through ``object.__setattr__``, ~4 µs for IncomingMessage against ~1.7 (measured), so those
are immutable by convention (never assigned; hashable through ``unsafe_hash``), as the agent's
per-message records are. States are string enums whose values are exactly what the store's
columns (and the FHIR resources built from them) hold. Times are integer epoch
milliseconds, like the Medplum agent's queue (medplum-protocol.md §5).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AgentStatus",
    "ChannelStatus",
    "MessageStatus",
    "IntakeKind",
    "AgentCredentials",
    "AgentRecord",
    "ChannelRecord",
    "BotRecord",
    "IncomingMessage",
    "IntakeResult",
    "MessageResult",
    "Answer",
    "MessageRecord",
    "MessageQuery",
    "MessagePage",
    "ResourceRecord",
    "StoredReply",
    "RetentionPolicy",
]


class AgentStatus(str, enum.Enum):
    """``Agent.status``: an agent that is ``off`` has every transmit refused."""

    ACTIVE = "active"
    OFF = "off"


class ChannelStatus(str, enum.Enum):
    """``Endpoint.status``: an ``off`` channel is skipped by the agent."""

    ACTIVE = "active"
    OFF = "off"


class MessageStatus(str, enum.Enum):
    """Life of an inbound message: stored, then processed by its bot or failed."""

    RECEIVED = "received"
    PROCESSED = "processed"
    ERROR = "error"


class IntakeKind(enum.IntEnum):
    """What storing one inbound message found."""

    NEW = 0  #: first time the hub sees this callback: run the bot
    DUPLICATE = 1  #: a resend of a stored callback (or ``duplicateOf`` a stored one)


@dataclass(frozen=True, slots=True)
class AgentCredentials:
    """What ``add_agent`` returns. ``client_secret`` is shown once and stored only hashed."""

    agent_id: str
    client_id: str
    client_secret: str


@dataclass(frozen=True, slots=True)
class AgentRecord:
    id: str
    name: str
    status: AgentStatus
    client_id: str
    settings: dict[str, Any]
    created_at: int
    updated_at: int


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    """One agent channel; its FHIR form is an ``Endpoint`` plus an ``Agent.channel`` entry."""

    id: str
    agent_id: str
    name: str
    address: str
    bot_id: str
    status: ChannelStatus


@dataclass(frozen=True, slots=True)
class BotRecord:
    """A bot: an importable callable named ``"module:function"``."""

    id: str
    name: str
    callable: str


@dataclass(slots=True, unsafe_hash=True)  # per message: not frozen (module docstring)
class IncomingMessage:
    """One ``agent:transmit:request`` as the hub stores it (header fields already scanned)."""

    agent_id: str
    channel: str
    remote: str
    callback: str
    content_type: str
    body: str
    received_at: int
    control_id: str | None = None
    message_type: str | None = None
    duplicate_of: str | None = None
    #: False when the agent said no device waits for the reply (``noReply``): recorded, not sent.
    reply_wanted: bool = True


@dataclass(slots=True, unsafe_hash=True)  # per message: not frozen (module docstring)
class StoredReply:
    """The reply the hub already gave for a message (replayed to resends)."""

    body: str
    content_type: str
    status_code: int


@dataclass(slots=True, unsafe_hash=True)  # per message: not frozen (module docstring)
class IntakeResult:
    """Outcome of storing one :class:`IncomingMessage`.

    For a duplicate, ``reply`` is the stored reply when the first copy was already processed;
    ``None`` means the first copy was stored but never answered (the hub stopped meanwhile).
    A new message has a ``reply`` when the round's :data:`Answer` answered it (the reply was
    committed with the row).
    """

    kind: IntakeKind
    reply: StoredReply | None = None


@dataclass(slots=True, unsafe_hash=True)  # per message: not frozen (module docstring)
class MessageResult:
    """What processing a stored message produced; written back by ``record_results``."""

    callback: str
    status: MessageStatus
    reply: StoredReply | None
    error: str | None
    processed_at: int


#: Asked by a store round, with a message's position in its group, for the result of a message
#: that needs its bot (new, or a resend of one stored without a reply); a result is written in
#: that same transaction (the row is inserted with it), ``None`` leaves the message unanswered.
#: The hub's intake runs inline bots this way: one row write per message, no later update.
Answer = Callable[[int], "MessageResult | None"]


@dataclass(frozen=True, slots=True)
class MessageRecord:
    id: int
    agent_id: str
    channel: str
    remote: str
    callback: str
    control_id: str | None
    message_type: str | None
    content_type: str
    body: str | None  #: None unless the query asked for bodies
    body_size: int
    received_at: int
    status: MessageStatus
    reply_body: str | None
    reply_content_type: str | None
    reply_status: int | None
    error: str | None
    duplicate: int
    duplicate_of: str | None
    processed_at: int | None


@dataclass(frozen=True, slots=True)
class MessageQuery:
    """Filters for a page of messages. ``after_id`` is the keyset cursor (exclusive)."""

    agent_id: str | None = None
    channel: str | None = None
    message_type: str | None = None  #: "ADT" matches every ADT^*, "ADT^A01" matches exactly
    control_id: str | None = None
    since: int | None = None  #: received_at >= since (epoch ms)
    until: int | None = None  #: received_at < until (epoch ms)
    status: MessageStatus | None = None
    after_id: int = 0
    limit: int = 100
    include_body: bool = False


@dataclass(frozen=True, slots=True)
class MessagePage:
    """One page; ``next_after_id`` is the cursor of the next page, ``None`` on the last one."""

    messages: tuple[MessageRecord, ...]
    next_after_id: int | None


@dataclass(frozen=True, slots=True)
class ResourceRecord:
    """A FHIR resource produced by a bot, keyed by (type, identifier)."""

    resource_type: str
    id: str
    identifier: str
    resource: dict[str, Any]
    updated_at: int


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long a channel's messages are kept (``None``: no limit). Ages are seconds since receipt.

    Bodies (message and reply text: the PHI) go first, after ``body_max_age_s``; the metadata row
    (ids, type, status, sizes) after ``max_age_s``.
    """

    max_age_s: float | None = 90 * 86400.0
    body_max_age_s: float | None = 30 * 86400.0

    def validate(self, name: str) -> None:
        for label, value in (("max_age_s", self.max_age_s), ("body_max_age_s", self.body_max_age_s)):
            if value is not None and value <= 0:
                raise ValueError(f"{name}.{label} must be positive (or None for no limit), not {value}")
