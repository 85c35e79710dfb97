"""Records and states of the durable inbound queue.

A message's life in the queue, one row per message accepted from a device:

    RECEIVED --(handed to the link)--> SENT --(hub confirmed)--> CONFIRMED --(retention)--> deleted
        ^                                |
        +------(link lost / timeout)-----+
    RECEIVED/SENT --(given up: hub rejected it, operator)--> FAILED --(retry)--> RECEIVED

Invariants:
* a row is inserted (and committed) before the device is told anything about it (except in
  `ackMode=immediate`, which bypasses the queue);
* RECEIVED and SENT rows are *pending*: they are never deleted by retention, only by an explicit
  operator action, and are delivered again after a restart (SENT means "possibly delivered");
* `CommitResult.ok` is true exactly when the row is durable (or, for a DROP duplicate, when the
  earlier row it repeats is durable).

These types are plain values (frozen, slotted) so they can cross the writer thread and the event
loop without copying or locking.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "HL7_V2_CONTENT_TYPE",
    "RowState",
    "DuplicatePolicy",
    "InboundRecord",
    "CommitResult",
    "QueuedMessage",
]

#: Medplum's content type for HL7 v2 ER7 payloads on the agent websocket.
HL7_V2_CONTENT_TYPE = "x-application/hl7-v2+er7"


class RowState(enum.IntEnum):
    """State of one queue row (stored as this integer in SQLite)."""

    RECEIVED = 0
    SENT = 1
    CONFIRMED = 2
    FAILED = 3


#: States of rows that still owe a delivery to the hub.
PENDING_STATES = (RowState.RECEIVED, RowState.SENT)


class DuplicatePolicy(enum.Enum):
    """What to do with a message whose (channel, sender, MSH-10) was seen inside the window.

    OFF: no lookup, always insert. FLAG: insert and record `duplicate_of` (the hub decides).
    DROP: do not insert; the result points at the earlier row (the channel may still ACK it,
    since the earlier copy is durable).
    """

    OFF = "off"
    FLAG = "flag"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class InboundRecord:
    """One message as accepted from a device, before it has a row id."""

    channel: str
    remote: str  # device "ip:port"
    sender: str  # MSH-3 + "^" + MSH-4 (part of the dedup key)
    control_id: str  # MSH-10
    message_type: str  # MSH-9
    body: bytes  # exactly as received (MLLP payload)
    received_at: float  # time.time()
    content_type: str = HL7_V2_CONTENT_TYPE


@dataclass(frozen=True, slots=True)
class CommitResult:
    """Outcome of committing one InboundRecord.

    ok is `error is None`. For a DROP duplicate `row_id` is None and `duplicate_of` is set;
    for a FLAG duplicate both are set. On a storage failure `error` holds a short reason that
    can go into MSA-3 (e.g. "storage error: database or disk is full").
    """

    row_id: int | None
    duplicate_of: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def dropped(self) -> bool:
        """True for a DROP duplicate: nothing was inserted, the earlier row stands for it."""
        return self.error is None and self.row_id is None


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A committed row, as the dispatcher sends it to the hub.

    `attempts` counts earlier hand-outs that ended without a confirmation (0 on first delivery).
    """

    row_id: int
    channel: str
    remote: str
    control_id: str
    message_type: str
    body: bytes
    content_type: str
    received_at: float
    attempts: int
    duplicate_of: int | None
