"""Lock-step MLLP load generator: the client side of `medagent bench`.

Theory of operation
-------------------
A load is `LoadSpec.conns` TCP connections to one MLLP listener. Each connection is a lock-step
sender (one message in flight, as real HL7 interfaces behave): it sends one framed message
(MLLP Release 2 block ``SB payload EB CR``), waits for the whole ACK frame, checks it, records
the latency and sends the next. Every message carries a new MSH-10 control id, written over the
template's MSH-10 (HL7 v2.x ch. 2.14.9.10), and the ACK must echo it in MSA-2 (ch. 2.14.8.2)
with an MSA-1 code the ACK mode promises (`ACCEPTED_CODES`): AA for fast, immediate and original
mode, CA for two-phase, whose later application ACKs (AA) are counted as `late_acks`.

Time runs on one `Schedule` of CLOCK_MONOTONIC instants shared by every worker process:
``start`` (all connections are open; senders begin), ``warm_end`` (measurement begins: ACKs
arriving before it are warm-up and are not counted) and ``end`` (measurement stops; senders
send nothing more, in-flight ACKs get a short grace, then connections close). A load also stops
when `LoadSpec.max_messages` ACKs (warm-up included) have arrived; the measured window is then
cut at the last ACK.

One process can drive many connections but may become the bottleneck, so `run_load` can split
the connections over P worker processes (each on uvloop when available), start them on one
schedule and merge their results; latencies go into a `LatencyHistogram` (log-linear fixed
buckets, relative error < 0.4 %), which merges exactly.

Invariants
----------
* Only ACKs that arrive inside ``[warm_end, end)`` count in `messages`, the latency histogram
  and the rate; `bad_acks`, `timeouts` and `disconnects` count over the whole run, and
  `unanswered` counts messages still without an ACK 2 s after the end (all four are errors).
* A connection never has more than one message in flight; a connection that gets no ACK within
  `ack_timeout_s` is counted in `timeouts` and closed (lock-step cannot resume safely).
* Control ids are unique per run: 2 random base-36 characters, the worker and connection number
  and a per-connection decimal sequence (12 characters, as the template's, until a connection
  passes 10**7 messages).
* Message bodies are never logged or printed.
"""

from __future__ import annotations

import asyncio
import math
import json
import os
import random
import select
import string
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Final, Protocol

from medagent.proto import hl7

__all__ = [
    "ACCEPTED_CODES",
    "SLOW_ACK_US",
    "LATE_CODES",
    "SAMPLE_ADT_A01",
    "LoadError",
    "LoadSpec",
    "Schedule",
    "LatencyHistogram",
    "WorkerResult",
    "LoadResult",
    "Monitor",
    "WindowObserver",
    "frame_template",
    "run_senders",
    "run_load",
    "default_procs",
]

#: An ACK this slow (µs) or slower counts as slow for LoadResult.slow_time_pct (the C client's too).
SLOW_ACK_US = 1000

START_BLOCK: Final = b"\x0b"
END_BLOCK: Final = b"\x1c"
CARRIAGE_RETURN: Final = b"\r"

#: The 625-byte (framed) HL7 v2.5.1 ADT^A01 of the performance targets: the HL7 standard's
#: fictitious "Good Health Hospital" patient, no real person. MSH-10 is 12 characters long.
SAMPLE_ADT_A01: Final = (
    b"MSH|^~\\&|ADT1|GOOD HEALTH HOSPITAL|GHH LAB, INC.|GOOD HEALTH HOSPITAL|20240315083000||"
    b"ADT^A01^ADT_A01|MSG000000001|P|2.5.1\r"
    b"EVN|A01|20240315083000|||AID123^SMITH^JOHN\r"
    b"PID|1||PATID1234^^^GOOD HEALTH HOSPITAL^MR||EVERYMAN^ADAM^A^III||19610615|M||"
    b"2106-3^WHITE^CDCREC|2222 HOME STREET^^GREENSBORO^NC^27401-1020^USA||^PRN^PH^^^555^5552004|"
    b"^WPN^PH^^^555^5553001||S||PATID12345001^2^M10^ADT1^AN^A|444333333|987654^NC\r"
    b"NK1|1|NUCLEAR^NELDA^W|SPO^SPOUSE||||NK^NEXT OF KIN\r"
    b"PV1|1|I|2000^2012^01||||004777^ATTEND^AARON^A|||SUR||||ADM|A0|||||||||||||||||||||||||"
    b"20240315083000\r"
    b"AL1|1||^ASPIRIN\r"
    b"DG1|1||786.50^CHEST PAIN, UNSPECIFIED^I9|||A\r"
)

#: MSA-1 codes that answer the message in flight, per ACK mode (DESIGN.md "ACK modes").
ACCEPTED_CODES: Final[Mapping[str, frozenset[str]]] = {
    "fast": frozenset({"AA"}),
    "immediate": frozenset({"AA"}),
    "original": frozenset({"AA"}),
    "two-phase": frozenset({"CA"}),
}
#: MSA-1 codes of application ACKs that may arrive after the lock-step ACK, per mode.
LATE_CODES: Final[Mapping[str, frozenset[str]]] = {
    "two-phase": frozenset({"AA"}),
}

_STOP_GRACE_S: Final = 2.0
_READY_TIMEOUT_S: Final = 60.0
_START_LEAD_S: Final = 0.2
_ID_ALPHABET: Final = string.digits + string.ascii_uppercase
_MAX_CONNS_PER_WORKER: Final = len(_ID_ALPHABET) ** 2
_MAX_WORKERS: Final = len(_ID_ALPHABET)
#: How long a monitor may take to report its last window after the senders stopped (run_senders).
_MONITOR_GRACE_S: Final = 1.0
_WORKER_COMMAND: Final = "from medagent.bench.loadgen import worker_entry; worker_entry()"


class LoadError(RuntimeError):
    """The load could not run (no listener, bad template, a worker failed); says what to fix."""


# ---------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One load: where, how many lock-step connections, for how long, what counts as an ACK."""

    host: str
    port: int
    conns: int
    duration_s: float
    warmup_s: float = 1.0
    max_messages: int = 50_000_000
    message: bytes = SAMPLE_ADT_A01
    accept: frozenset[str] = frozenset({"AA"})
    late_codes: frozenset[str] = frozenset()
    ack_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.conns < 1:
            raise ValueError(f"conns must be at least 1, not {self.conns}")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("duration must be > 0 s and warm-up >= 0 s")
        if self.max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, not {self.max_messages}")

    @classmethod
    def for_mode(cls, mode: str, host: str, port: int, conns: int, duration_s: float,
                 **options: Any) -> LoadSpec:
        """A spec whose ACK check matches ACK mode `mode` (fast|immediate|original|two-phase)."""
        if mode not in ACCEPTED_CODES:
            raise ValueError(f"unknown ACK mode {mode!r}; choose from {', '.join(ACCEPTED_CODES)}")
        return cls(host, port, conns, duration_s, accept=ACCEPTED_CODES[mode],
                   late_codes=LATE_CODES.get(mode, frozenset()), **options)


@dataclass(frozen=True, slots=True)
class Schedule:
    """The run's instants, in time.monotonic_ns() (CLOCK_MONOTONIC, shared by processes)."""

    start_ns: int
    warm_end_ns: int
    end_ns: int

    @classmethod
    def starting_in(cls, delay_s: float, warmup_s: float, duration_s: float) -> Schedule:
        start = time.monotonic_ns() + int(delay_s * 1e9)
        warm_end = start + int(warmup_s * 1e9)
        return cls(start, warm_end, warm_end + int(duration_s * 1e9))


def frame_template(message: bytes) -> tuple[bytes, bytes, int]:
    """(framed bytes before MSH-10, framed bytes after it, length of the template's MSH-10).

    LoadError when the message does not start with an MSH segment that has an MSH-10.
    """
    if not message.startswith(b"MSH") or len(message) < 4:
        raise LoadError("the load message must start with an MSH segment")
    separator = message[3:4]
    segment_end = min((i for i in (message.find(b"\r"), message.find(b"\n")) if i >= 0),
                      default=len(message))
    fields = message[:segment_end].split(separator)
    if len(fields) < 10:
        raise LoadError("the load message's MSH has no MSH-10 (message control id)")
    start = len(separator.join(fields[:9])) + 1
    end = start + len(fields[9])
    return START_BLOCK + message[:start], message[end:] + END_BLOCK + CARRIAGE_RETURN, end - start


# ---------------------------------------------------------------------------------------------
# Latency histogram
# ---------------------------------------------------------------------------------------------


class LatencyHistogram:
    """Fixed log-linear buckets of nanosecond latencies (HdrHistogram's idea, 8 sub-bucket bits).

    Values below 2**9 ns are exact; above, each power-of-two range is cut into 256 buckets, so a
    reported percentile is within 0.4 % of the truth. Merging adds counts: exact and associative.
    """

    SUB_BITS: Final = 8
    __slots__ = ("counts", "total", "max_ns")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.max_ns = 0

    @classmethod
    def bucket_of(cls, value_ns: int) -> int:
        exponent = value_ns.bit_length() - (cls.SUB_BITS + 1)
        if exponent <= 0:
            return value_ns
        return (exponent << cls.SUB_BITS) + (value_ns >> exponent)

    @classmethod
    def bucket_high(cls, index: int) -> int:
        """The largest value that falls into bucket `index`."""
        if index < 1 << (cls.SUB_BITS + 1):
            return index
        exponent = (index >> cls.SUB_BITS) - 1
        mantissa = index - (exponent << cls.SUB_BITS)
        return ((mantissa + 1) << exponent) - 1

    def record(self, value_ns: int) -> None:
        index = self.bucket_of(value_ns)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.total += 1
        if value_ns > self.max_ns:
            self.max_ns = value_ns

    def merge(self, other: LatencyHistogram) -> None:
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.total += other.total
        self.max_ns = max(self.max_ns, other.max_ns)

    def percentile_ns(self, fraction: float) -> int | None:
        """The smallest bucket bound that covers `fraction` (0..1] of the values; None if empty."""
        if not self.total:
            return None
        wanted = max(1, math.ceil(fraction * self.total))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= wanted:
                return min(self.bucket_high(index), self.max_ns)
        return self.max_ns

    def time_share_at_least(self, threshold_ns: int) -> float | None:
        """The share (0..1) of the summed latency that lies in values of `threshold_ns` or more
        (each bucket counted at its upper bound); None if empty."""
        waited = slow = 0
        for index, count in self.counts.items():
            high = self.bucket_high(index)
            weight = high * count
            waited += weight
            if high >= threshold_ns:
                slow += weight
        return slow / waited if waited else None

    def to_dict(self) -> dict[str, Any]:
        return {"counts": {str(k): v for k, v in self.counts.items()}, "total": self.total,
                "max_ns": self.max_ns}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyHistogram:
        histogram = cls()
        histogram.counts = {int(k): int(v) for k, v in data["counts"].items()}
        histogram.total = int(data["total"])
        histogram.max_ns = int(data["max_ns"])
        return histogram


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class WorkerResult:
    """What one worker (one event loop) measured; merged by `LoadResult.merge`."""

    conns: int
    messages: int = 0
    warmup_messages: int = 0
    bad_acks: int = 0
    late_acks: int = 0
    timeouts: int = 0
    disconnects: int = 0
    unanswered: int = 0
    window_s: float = 0.0
    cpu_s: float = 0.0
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__slots__ if name != "histogram"}
        data["histogram"] = self.histogram.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerResult:
        values = dict(data)
        values["histogram"] = LatencyHistogram.from_dict(values["histogram"])
        return cls(**values)


def _us(value_ns: int | None) -> float | None:
    return None if value_ns is None else round(value_ns / 1000.0, 1)


def _pct(share: float | None) -> float | None:
    return None if share is None else round(100.0 * share, 1)


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One load's outcome. Latencies in µs (None when not measured); cpu_pct is of one core."""

    client: str
    conns: int
    procs: int
    messages: int
    seconds: float
    rate: float
    p50_us: float | None
    p99_us: float | None
    p999_us: float | None
    max_us: float | None
    bad_acks: int
    timeouts: int
    disconnects: int
    late_acks: int
    cpu_pct: float | None
    unanswered: int = 0
    #: % of the summed latency spent in ACKs of SLOW_ACK_US or more (None: not measured)
    slow_time_pct: float | None = None

    @property
    def errors(self) -> int:
        return self.bad_acks + self.timeouts + self.disconnects + self.unanswered

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["errors"] = self.errors
        return data

    @classmethod
    def merge(cls, workers: Iterable[WorkerResult]) -> LoadResult:
        parts = list(workers)
        histogram = LatencyHistogram()
        for part in parts:
            histogram.merge(part.histogram)
        seconds = max((p.window_s for p in parts), default=0.0)
        rate = sum(p.messages / p.window_s for p in parts if p.window_s > 0)
        cpu_s = sum(p.cpu_s for p in parts)
        return cls(
            client="medagent",
            conns=sum(p.conns for p in parts),
            procs=len(parts),
            messages=sum(p.messages for p in parts),
            seconds=round(seconds, 3),
            rate=round(rate, 1),
            p50_us=_us(histogram.percentile_ns(0.50)),
            p99_us=_us(histogram.percentile_ns(0.99)),
            p999_us=_us(histogram.percentile_ns(0.999)),
            max_us=_us(histogram.max_ns if histogram.total else None),
            bad_acks=sum(p.bad_acks for p in parts),
            timeouts=sum(p.timeouts for p in parts),
            disconnects=sum(p.disconnects for p in parts),
            late_acks=sum(p.late_acks for p in parts),
            cpu_pct=round(100.0 * cpu_s / seconds, 1) if seconds > 0 else None,
            unanswered=sum(p.unanswered for p in parts),
            slow_time_pct=_pct(histogram.time_share_at_least(SLOW_ACK_US * 1000)),
        )


# ---------------------------------------------------------------------------------------------
# One event loop's senders
# ---------------------------------------------------------------------------------------------


class _Run:
    """State shared by the senders of one event loop."""

    def __init__(self, spec: LoadSpec, schedule: Schedule, budget: int, result: WorkerResult) -> None:
        self.spec = spec
        self.schedule = schedule
        self.budget = budget
        self.result = result
        self.head, self.tail, self.id_width = frame_template(spec.message)
        self.acked = 0
        self.last_ack_ns = 0
        # Per-window progress for long runs (the soak): measured ACKs and the slowest one since
        # the last `take_window`.
        self.window_acks = 0
        self.window_max_ns = 0
        self.stopping = False
        self.open_senders = 0
        self.all_closed = asyncio.get_running_loop().create_future()

    def take_window(self) -> tuple[int, int]:
        """(measured ACKs, slowest send-to-ACK ns) since the previous call; resets both."""
        taken = (self.window_acks, self.window_max_ns)
        self.window_acks = self.window_max_ns = 0
        return taken

    def sender_closed(self) -> None:
        self.open_senders -= 1
        if self.open_senders <= 0 and not self.all_closed.done():
            self.all_closed.set_result(None)


def _msa(frame: bytes) -> tuple[str, str]:
    """(MSA-1, MSA-2) of an ACK frame's payload (``proto.hl7.parse_ack``), ("", "") without one."""
    try:
        info = hl7.parse_ack(frame)
    except hl7.Hl7Error:
        return "", ""
    return ("", "") if info is None else (info.code, info.control_id)


class _Sender(asyncio.Protocol):
    """One lock-step connection: send, wait for the ACK frame, check, record, repeat."""

    def __init__(self, run: _Run, prefix: bytes) -> None:
        self.run = run
        self.prefix = prefix
        self.sequence = 0
        self.expected = b""
        self.expected_text = ""  # the same control id as parse_ack returns it (latin-1)
        self.sent_ns = 0
        self.in_flight = False
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.closed = False

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.run.open_senders += 1

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        end = buffer.find(END_BLOCK)
        while end >= 0 and not self.closed:
            start = buffer.rfind(START_BLOCK, 0, end)
            self.on_frame(buffer[start + 1:end])
            buffer = buffer[end + 1:]
            if buffer[:1] == CARRIAGE_RETURN:
                buffer = buffer[1:]
            end = buffer.find(END_BLOCK)
        self.buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            if not self.run.stopping:
                self.run.result.disconnects += 1
            self.run.sender_closed()

    # lock-step --------------------------------------------------------------------------------

    def send_next(self) -> None:
        self.sequence += 1
        self.expected = self.prefix + b"%0*d" % (self.run.id_width - len(self.prefix), self.sequence)
        self.expected_text = self.expected.decode("latin-1")
        self.in_flight = True
        self.sent_ns = time.monotonic_ns()
        assert self.transport is not None
        self.transport.write(self.run.head + self.expected + self.run.tail)

    def on_frame(self, frame: bytes) -> None:
        now = time.monotonic_ns()
        run = self.run
        code, control_id = _msa(frame)
        if not self.in_flight or control_id != self.expected_text:
            if code in run.spec.late_codes:
                run.result.late_acks += 1
            else:
                run.result.bad_acks += 1
            return
        self.in_flight = False
        if code not in run.spec.accept:
            run.result.bad_acks += 1
        self.count(now)
        if run.stopping or now >= run.schedule.end_ns or run.acked >= run.budget:
            run.stopping = True
            self.close()
        else:
            self.send_next()

    def count(self, now: int) -> None:
        run = self.run
        run.acked += 1
        if now < run.schedule.warm_end_ns:
            run.result.warmup_messages += 1
        elif now < run.schedule.end_ns:
            latency = now - self.sent_ns
            run.result.messages += 1
            run.result.histogram.record(latency)
            run.last_ack_ns = now
            run.window_acks += 1
            if latency > run.window_max_ns:
                run.window_max_ns = latency

    def check_timeout(self, now: int) -> None:
        if self.in_flight and not self.closed and now - self.sent_ns > self.run.spec.ack_timeout_s * 1e9:
            self.run.result.timeouts += 1
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self.run.sender_closed()


def _connection_prefix(tag: str, worker: int, conn: int) -> bytes:
    return (tag + _ID_ALPHABET[worker] + _ID_ALPHABET[conn // 36] + _ID_ALPHABET[conn % 36]).encode()


async def _open_senders(run: _Run, worker: int, count: int, tag: str) -> list[_Sender]:
    loop = asyncio.get_running_loop()
    spec = run.spec
    senders: list[_Sender] = []
    for conn in range(count):
        sender = _Sender(run, _connection_prefix(tag, worker, conn))
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda s=sender: s, spec.host, spec.port),  # type: ignore[misc]
                spec.connect_timeout_s,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            for opened in senders:
                opened.close()
            raise LoadError(f"cannot connect to mllp://{spec.host}:{spec.port} ({exc or 'timeout'}); "
                            "is the system under test listening?") from None
        senders.append(sender)
    return senders


async def _sleep_until(instant_ns: int) -> None:
    delay = (instant_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


async def _watch(run: _Run, senders: list[_Sender]) -> None:
    """Time out silent connections until the end of the schedule, then stop everyone."""
    end = run.schedule.end_ns
    while not run.all_closed.done() and not run.stopping and time.monotonic_ns() < end:
        await asyncio.sleep(min(0.25, max(0.0, (end - time.monotonic_ns()) / 1e9)))
        now = time.monotonic_ns()
        for sender in senders:
            sender.check_timeout(now)
    run.stopping = True
    if not run.all_closed.done():
        try:
            await asyncio.wait_for(asyncio.shield(run.all_closed), _STOP_GRACE_S)
        except asyncio.TimeoutError:
            pass
    for sender in senders:
        if sender.in_flight and not sender.closed:
            run.result.unanswered += 1
        sender.close()


async def run_senders(spec: LoadSpec, schedule: Schedule | None = None, *, worker: int = 0,
                      conns: int | None = None, budget: int | None = None,
                      tag: str | None = None, go: GoSignal | None = None,
                      monitor: Monitor | None = None) -> WorkerResult:
    """Run lock-step senders in the running event loop and return what they measured.

    `schedule` defaults to "start now" with the spec's warm-up and duration. `worker`, `conns`,
    `budget` (max ACKs) and `tag` are set by `run_load` when it splits a load over processes;
    `go`, when given, is awaited after every connection is open and returns the schedule.
    `monitor`, when given, runs beside the senders from the start of the schedule until they
    stop (then it gets `_MONITOR_GRACE_S` to finish, and is cancelled) with the schedule and a `take_window` function (the soak's
    per-window throughput and slowest ACK).
    """
    count = spec.conns if conns is None else conns
    if not 0 <= worker < _MAX_WORKERS or not 1 <= count <= _MAX_CONNS_PER_WORKER:
        raise ValueError(f"at most {_MAX_WORKERS} workers of {_MAX_CONNS_PER_WORKER} connections")
    result = WorkerResult(conns=count)
    placeholder = schedule or Schedule.starting_in(0.0, spec.warmup_s, spec.duration_s)
    run = _Run(spec, placeholder, spec.max_messages if budget is None else budget, result)
    run_tag = tag or "".join(random.choices(_ID_ALPHABET, k=2))
    senders = await _open_senders(run, worker, count, run_tag)
    if go is not None:
        run.schedule = await go()
    elif schedule is None:
        run.schedule = Schedule.starting_in(0.0, spec.warmup_s, spec.duration_s)
    await _sleep_until(run.schedule.start_ns)
    cpu_start = time.process_time()
    for sender in senders:
        if not sender.closed:
            sender.send_next()
    watcher = None if monitor is None else asyncio.ensure_future(monitor(run.schedule, run.take_window))
    try:
        await _watch(run, senders)
        if watcher is not None:
            # The senders and the monitor both wake at the schedule's end; on a busy machine the
            # senders may come first, and cancelling then lost the monitor's last window.
            await asyncio.wait({watcher}, timeout=_MONITOR_GRACE_S)
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    window_end = run.schedule.end_ns if run.acked < run.budget else max(run.last_ack_ns, run.schedule.warm_end_ns)
    result.window_s = max(0.0, (min(window_end, run.schedule.end_ns) - run.schedule.warm_end_ns) / 1e9)
    elapsed = (time.monotonic_ns() - run.schedule.start_ns) / 1e9
    cpu = time.process_time() - cpu_start
    # CPU over the measured window only, assuming a steady load (warm-up and drain excluded).
    result.cpu_s = cpu * (result.window_s / elapsed) if elapsed > 0 else 0.0
    return result


class GoSignal(Protocol):
    async def __call__(self) -> Schedule: ...


# ---------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------


class Monitor(Protocol):
    """Runs beside the senders (see `run_senders`); `take_window()` returns (measured ACKs,
    slowest ACK ns) since its previous call."""

    def __call__(self, schedule: Schedule, take_window: Callable[[], tuple[int, int]]
                 ) -> Awaitable[None]: ...


class WindowObserver(Protocol):
    """Told when the measured window starts and ends (the harness samples CPU there)."""

    def window_started(self) -> None: ...

    def window_ended(self) -> None: ...


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _spec_to_json(spec: LoadSpec) -> dict[str, Any]:
    data = asdict(spec)
    data["message"] = spec.message.decode("latin-1")
    data["accept"] = sorted(spec.accept)
    data["late_codes"] = sorted(spec.late_codes)
    return data


def _spec_from_json(data: Mapping[str, Any]) -> LoadSpec:
    values = dict(data)
    values["message"] = values["message"].encode("latin-1")
    values["accept"] = frozenset(values["accept"])
    values["late_codes"] = frozenset(values["late_codes"])
    return LoadSpec(**values)


def _send_line(stream: IO[bytes], kind: str, payload: Any) -> None:
    stream.write(json.dumps([kind, payload]).encode() + b"\n")
    stream.flush()


def worker_entry() -> None:
    """Entry point of a worker process (`python -c`), spoken to over stdin/stdout, one JSON
    array per line: in ``["job", {...}]``, out ``["ready", n]``, in ``["go", [start, warm_end,
    end]]``, out ``["result", {...}]`` or ``["error", text]`` at any point."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

    def receive(expected: str) -> Any:
        kind, payload = json.loads(stdin.readline() or b'["eof", null]')
        if kind != expected:
            raise LoadError(f"the load coordinator sent {kind!r} instead of {expected!r}")
        return payload

    async def go() -> Schedule:
        _send_line(stdout, "ready", job["worker"])
        return Schedule(*await asyncio.get_running_loop().run_in_executor(None, receive, "go"))

    try:
        job = receive("job")
        spec = _spec_from_json(job["spec"])
        with asyncio.Runner(loop_factory=_new_event_loop) as runner:
            result = runner.run(run_senders(spec, worker=job["worker"], conns=job["conns"],
                                            budget=job["budget"], tag=job["tag"], go=go))
        _send_line(stdout, "result", result.to_dict())
    except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which raises LoadError
        _send_line(stdout, "error", f"{type(exc).__name__}: {exc}")


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _receive(process: subprocess.Popen[bytes], expected: str, deadline: float) -> Any:
    """The payload of the worker's next line, which must be of kind `expected`."""
    assert process.stdout is not None
    remaining = deadline - time.monotonic()
    ready, _, _ = select.select([process.stdout], [], [], max(0.0, remaining))
    if not ready:
        raise LoadError(f"a load worker did not answer ({expected}) in time")
    line = process.stdout.readline()
    if not line:
        raise LoadError(f"a load worker exited (status {process.wait(5)}) without a result")
    kind, payload = json.loads(line)
    if kind == "error":
        raise LoadError(f"a load worker failed: {payload}")
    if kind != expected:
        raise LoadError(f"a load worker sent {kind!r} instead of {expected!r}")
    return payload


def _start_workers(spec: LoadSpec, procs: int) -> list[subprocess.Popen[bytes]]:
    tag = "".join(random.choices(_ID_ALPHABET, k=2))
    workers = []
    for worker, (conns, budget) in enumerate(zip(_split(spec.conns, procs), _split(spec.max_messages, procs))):
        process = subprocess.Popen([sys.executable, "-P", "-c", _WORKER_COMMAND],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        workers.append(process)
        assert process.stdin is not None
        _send_line(process.stdin, "job", {"spec": _spec_to_json(spec), "worker": worker, "conns": conns,
                                          "budget": max(1, budget), "tag": tag})
    return workers


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for process in workers:
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
        try:
            process.wait(5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5.0)


def run_load(spec: LoadSpec, procs: int = 1, observer: WindowObserver | None = None) -> LoadResult:
    """Run `spec` from `procs` worker processes (connections split evenly) and merge the results.

    Workers are fresh interpreters (``python -c``), so the caller's ``__main__`` is never
    re-imported. Every worker opens its connections first; then one schedule starts them all
    together. `observer` (optional) is called at the start and end of the measured window.
    Blocks until the load is over; raises LoadError when a worker cannot connect or fails.
    """
    procs = max(1, min(procs, spec.conns))
    if procs > _MAX_WORKERS:
        raise ValueError(f"at most {_MAX_WORKERS} worker processes")
    workers = _start_workers(spec, procs)
    try:
        ready_deadline = time.monotonic() + _READY_TIMEOUT_S + spec.connect_timeout_s
        for process in workers:
            _receive(process, "ready", ready_deadline)
        schedule = Schedule.starting_in(_START_LEAD_S, spec.warmup_s, spec.duration_s)
        for process in workers:
            assert process.stdin is not None
            _send_line(process.stdin, "go", [schedule.start_ns, schedule.warm_end_ns, schedule.end_ns])
        _observe(schedule, observer)
        result_deadline = schedule.end_ns / 1e9 + spec.ack_timeout_s + _STOP_GRACE_S + 30.0
        results = [WorkerResult.from_dict(_receive(p, "result", result_deadline)) for p in workers]
    finally:
        _stop_workers(workers)
    return LoadResult.merge(results)


def _observe(schedule: Schedule, observer: WindowObserver | None) -> None:
    if observer is None:
        return
    time.sleep(max(0.0, (schedule.warm_end_ns - time.monotonic_ns()) / 1e9))
    observer.window_started()
    time.sleep(max(0.0, (schedule.end_ns - time.monotonic_ns()) / 1e9))
    observer.window_ended()


def default_procs() -> int:
    """One worker process: on small machines more workers steal CPU from the system under test."""
    return 1 if (os.cpu_count() or 1) <= 4 else 2
