"""Values that cross the seam between channels, the runtime and the durable queue.

A channel kind turns what a device sent into one :class:`InboundRecord` per accepted unit (an
HL7 message, a DICOM instance, an ASTM transmission, a framed byte string) and hands it to its
:class:`~medagent.channels.base.InboundSink`; the queue answers with a :class:`CommitResult`.
Channels import these types from here, never from ``medagent.queue`` (the queue is one sink
implementation; channels must not depend on it).

A record's payload is either inline bytes (``body``) or a file in the agent's data directory
(``file``, a :class:`FilePayload`): large units (DICOM instances) are streamed to disk by the
channel and only referenced here, so they never sit in memory or in a queue row. For a file
payload ``body`` carries the small metadata document the hub's bot receives (e.g. DICOM JSON
without bulk data) and may be empty.

Values are slotted and never changed after construction: they cross threads (the queue's
writer) without copies or locks. The two made once per message, :class:`InboundRecord` and
:class:`CommitResult`, are immutable by convention rather than ``frozen``: a frozen dataclass
sets each field through ``object.__setattr__``, which made their construction 3-8x slower (issue
19); they keep value equality and hashing (``unsafe_hash``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "HL7_V2_CONTENT_TYPE",
    "ASTM_CONTENT_TYPE",
    "OCTET_STREAM_CONTENT_TYPE",
    "DICOM_CONTENT_TYPE",
    "DuplicatePolicy",
    "FilePayload",
    "InboundRecord",
    "CommitResult",
]

#: Medplum's content type for HL7 v2 ER7 payloads on the agent websocket.
HL7_V2_CONTENT_TYPE = "x-application/hl7-v2+er7"
#: ASTM E1394 record text (one record per line; frame numbers and checksums removed).
ASTM_CONTENT_TYPE = "x-application/astm-e1394"
#: Medplum's byte-stream channel payloads.
OCTET_STREAM_CONTENT_TYPE = "application/octet-stream"
#: A DICOM instance stored as a file payload (Part 10); the transmit carries Medplum's JSON shape.
DICOM_CONTENT_TYPE = "application/dicom"


class DuplicatePolicy(enum.Enum):
    """What to do with a record whose dedup key was seen inside the window.

    The dedup key is (channel, sender, control id, digest of the payload): a reused control id
    with other content is a *new* message. OFF: no lookup, always insert. FLAG: insert and
    record ``duplicate_of`` (the hub decides). DROP: do not insert; the result points at the
    earlier row (the channel may still answer positively, since the earlier copy is durable).
    """

    OFF = "off"
    FLAG = "flag"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class FilePayload:
    """A payload stored as a file under the agent's data directory.

    ``path`` is relative to the data directory (so the directory can move), ``size`` in bytes,
    ``sha256`` the hex digest of the whole file (part of the dedup key, checked on delivery).
    The file is written and fsynced by the channel before the record is submitted; after that
    the queue owns it and deletes it with the row.
    """

    path: str
    size: int
    sha256: str


@dataclass(slots=True, unsafe_hash=True)  # immutable by convention (module docstring)
class InboundRecord:
    """One unit as accepted from a device, before it has a row id."""

    channel: str
    remote: str  # device "ip:port" (or the serial port name)
    sender: str  # part of the dedup key (HL7: MSH-3 "^" MSH-4; DICOM: calling AE title)
    control_id: str  # HL7 MSH-10, DICOM SOP Instance UID, ...
    message_type: str  # HL7 MSH-9, DICOM modality/SOP class, ...
    body: bytes  # inline payload exactly as received (or the metadata document of a file payload)
    received_at: float  # time.time()
    content_type: str = HL7_V2_CONTENT_TYPE
    file: FilePayload | None = None


@dataclass(slots=True, unsafe_hash=True)  # immutable by convention (module docstring)
class CommitResult:
    """Outcome of committing one InboundRecord.

    ok is `error is None`. For a DROP duplicate `row_id` is None and `duplicate_of` is set;
    for a FLAG duplicate both are set. On a storage failure `error` holds a short reason that
    can go into an answer to the device (e.g. "storage error: database or disk is full").
    ``control_id_reused`` is true when the control id was seen in the window with other content
    (the record was stored as a new message, not as a duplicate).
    """

    row_id: int | None
    duplicate_of: int | None = None
    error: str | None = None
    control_id_reused: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def dropped(self) -> bool:
        """True for a DROP duplicate: nothing was inserted, the earlier row stands for it."""
        return self.error is None and self.row_id is None
