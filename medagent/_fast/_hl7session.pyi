"""Type stub of the Cython ACK sequencer; same public shape as medagent.proto._hl7session_py."""

from typing import Any, ClassVar, final

from medagent.proto._hl7session_py import FramingError, Rejected, ReplyResult, SlotState
from medagent.records import CommitResult, InboundRecord

__all__ = ["Hl7CountersC", "Hl7SessionC", "SequenceCounterC", "SlotC"]

class SequenceCounterC:
    next: int
    def __init__(self, start: int = ...) -> None: ...

class Hl7CountersC:
    INTEGER_FIELDS: ClassVar[tuple[str, ...]]
    connections_total: int
    connections_refused: int
    connections_closed_for_errors: int
    connections_idle_closed: int
    messages_received: int
    messages_rejected: int
    framing_errors: int
    acks_suppressed: int
    acks_lost: int
    replies_other: int
    bytes_received: int
    bytes_sent: int
    replies_delivered: int
    replies_suppressed: int
    replies_late: int
    replies_no_connection: int
    replies_timed_out: int
    seq_no_skipped: int
    discarded_bytes: int
    missing_cr: int
    truncated_frames: int
    sink_errors: int
    control_id_reused: int
    answers: dict[str, int]
    latency: list[int]
    latency_bounds: tuple[float, ...]
    def __init__(self, latency_bounds: tuple[float, ...] = ...) -> None: ...
    @property
    def acks_positive(self) -> int: ...
    @property
    def acks_negative(self) -> int: ...
    def as_dict(self) -> dict[str, int]: ...

@final
class SlotC:
    session: Hl7SessionC
    message: bytes
    control_id: str
    accept_ack_type: str
    app_ack_type: str
    charset: str
    ack: bytes | None
    ack_code: str | None
    record: InboundRecord | None
    deadline: float
    received: float
    def __init__(self, session: Hl7SessionC, message: bytes, control_id: str, accept_ack_type: str,
                 app_ack_type: str, charset: str, state: SlotState, received: float) -> None: ...
    @property
    def state(self) -> SlotState: ...
    def committed(self, result: CommitResult) -> None: ...

@final
class Hl7SessionC:
    options: Any
    mode: Any
    channel: str
    remote: str
    listener: Any
    durable: bool
    closed: bool
    framing_errors_in_row: int
    counters: Hl7CountersC
    sequence: SequenceCounterC
    def __init__(self, options: Any, *, channel: str = ..., remote: str = ..., counters: Hl7CountersC | None = ...,
                 sequence: SequenceCounterC | None = ..., listener: Any = ...) -> None: ...
    @property
    def outstanding(self) -> int: ...
    @property
    def unfinished(self) -> int: ...
    @property
    def writable(self) -> bool: ...
    def next_deadline(self) -> float | None: ...
    def receive_frame(self, frame: Any, now: float, received_at: float) -> SlotC | Rejected | FramingError: ...
    def committed(self, slot: SlotC, result: CommitResult) -> None: ...
    def expire(self, now: float) -> list[str]: ...
    def reply(self, control_id: str, body: str, status_code: int = ..., now: float = ...) -> ReplyResult: ...
    def data_to_send(self, now: float | None = ..., *, lost: bool = ...) -> bytes: ...
    def close(self) -> None: ...
