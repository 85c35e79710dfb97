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

from medagent.records import HL7_V2_CONTENT_TYPE, CommitResult, DuplicatePolicy, FilePayload, InboundRecord

__all__ = [
    "HL7_V2_CONTENT_TYPE",
    "RowState",
    "DuplicatePolicy",
    "InboundRecord",
    "FilePayload",
    "CommitResult",
    "QueuedMessage",
]


class RowState(enum.IntEnum):
    """State of one queue row (stored as this integer in SQLite)."""

    RECEIVED = 0
    SENT = 1
    CONFIRMED = 2
    FAILED = 3


#: States of rows that still owe a delivery to the hub.
PENDING_STATES = (RowState.RECEIVED, RowState.SENT)


@dataclass(slots=True, unsafe_hash=True)  # one per row: not frozen (construction ~5x cheaper); never assigned
class QueuedMessage:
    """A committed row, as the dispatcher sends it to the hub.

    `attempts` counts earlier hand-outs that ended without a confirmation (0 on first delivery).
    `file` is set for a file payload (then `body` is its metadata document): the path is relative
    to the agent's data directory; the delivery side reads the file, the queue never does.
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
    file: FilePayload | None = None
