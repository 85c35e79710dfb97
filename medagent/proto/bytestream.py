"""Start/end-character framing of raw byte streams (Medplum's ``tcp://`` channel), sans-I/O.

Reference: Medplum agent ``bytestream.ts`` (``ByteStreamChannelConnection.handler``,
``ByteSequenceMatcher``, ``filterMessageBytes``), newest version, as summarised in
shared/medplum-next-waves.md §3.1 and §0. medagent keeps those semantics byte for byte and adds
a maximum frame size (Medplum has none).

Theory of operation
-------------------
:class:`ByteStreamFramer` is fed chunks of one connection's stream; for every byte, in order:

1. *autoRespond* (a link-level handshake, before and independent of framing): the byte enters a
   sliding window as long as the longest pattern; every rule whose pattern now ends the window
   yields a :class:`Respond` with its response, in rule order.
2. *framing*: the start char (re)starts a frame (a partial frame is dropped) and resets the
   autoRespond window; the end char completes the frame when one is open (else it is ignored);
   any other byte is appended to an open frame and dropped outside one. A frame is the bytes
   from the start char through the end char, both included.
3. a complete frame is filtered (:func:`filter_frame`): every ``stripSequence`` occurrence is
   removed (longest sequence first at each offset; the scan resumes after a match), then with
   ``stripControlChars`` every C0 byte (0x00-0x1F, framing chars included) not listed in
   ``keepControlChars`` is dropped. The result is a :class:`Frame`.

Beyond Medplum: a frame longer than ``max_frame_size`` bytes (counted before filtering) is
dropped when it reaches the limit, reported once as :class:`FrameTooLarge`, and the rest of it,
up to the next start char, is discarded (the next end char is then an end without a start and is
ignored, as Medplum ignores one).

Invariants
----------
* The events do not depend on how the stream is cut into chunks (tested with hypothesis).
* The framer never holds more than ``max_frame_size`` bytes.
* Responses are emitted at the byte that completes their pattern, before the frame that byte
  may end.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "AutoRespondRule",
    "ByteStreamConfig",
    "ByteStreamFramer",
    "Frame",
    "FrameTooLarge",
    "Respond",
    "filter_frame",
]


@dataclass(frozen=True, slots=True)
class AutoRespondRule:
    """``autoRespond=<pattern>:<response>``: write ``response`` when ``pattern`` completes."""

    pattern: bytes
    response: bytes


@dataclass(frozen=True, slots=True)
class ByteStreamConfig:
    """The framing settings of one channel (Medplum's parameters plus ``max_frame_size``)."""

    start_byte: int
    end_byte: int
    auto_respond: tuple[AutoRespondRule, ...] = ()
    strip_sequences: tuple[bytes, ...] = ()
    strip_control_chars: bool = False
    keep_control_chars: frozenset[int] = frozenset()
    max_frame_size: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if not (0 <= self.start_byte <= 0xFF and 0 <= self.end_byte <= 0xFF):
            raise ValueError("start and end chars must be byte values")
        if self.start_byte == self.end_byte:
            raise ValueError("start and end chars must differ")
        if self.max_frame_size < 1:
            raise ValueError("max_frame_size must be positive")


@dataclass(frozen=True, slots=True)
class Respond:
    """Bytes to write back at once (an autoRespond rule matched)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Frame:
    """One framed unit, filtered."""

    data: bytes


@dataclass(frozen=True, slots=True)
class FrameTooLarge:
    """A frame reached ``max_frame_size`` and was dropped."""

    size: int


Event = Respond | Frame | FrameTooLarge


def filter_frame(frame: bytes, strip_sequences: Sequence[bytes], strip_control_chars: bool,
                 keep_control_chars: Iterable[int] = ()) -> bytes:
    """Medplum's ``filterMessageBytes``: remove whole sequences (longest first), then C0 bytes."""
    if not strip_sequences and not strip_control_chars:
        return frame
    longest_first = sorted(strip_sequences, key=len, reverse=True)
    keep = frozenset(b for b in keep_control_chars if b < 0x20)
    out = bytearray()
    i, n = 0, len(frame)
    while i < n:
        for sequence in longest_first:
            if frame.startswith(sequence, i):
                i += len(sequence)
                break
        else:
            byte = frame[i]
            if not (strip_control_chars and byte < 0x20 and byte not in keep):
                out.append(byte)
            i += 1
    return bytes(out)


class ByteStreamFramer:
    """Frames one connection's byte stream (see the module docstring)."""

    def __init__(self, config: ByteStreamConfig) -> None:
        self.config = config
        self._frame: bytearray | None = None  # None: outside a frame
        self._oversize = False  # discarding the rest of an oversize frame
        self._window = bytearray()
        self._window_size = max((len(rule.pattern) for rule in config.auto_respond), default=0)
        self._rules = config.auto_respond
        special = {config.start_byte, config.end_byte} | {rule.pattern[-1] for rule in config.auto_respond}
        self._special = re.compile(b"[" + b"".join(re.escape(bytes((b,))) for b in sorted(special)) + b"]")
        self.discarded_bytes = 0

    @property
    def pending_bytes(self) -> int:
        return len(self._frame) if self._frame is not None else 0

    def feed(self, data: bytes) -> list[Event]:
        if not self._rules:
            return self._feed_fast(data)
        return self._feed_rules(data)

    def _feed_rules(self, data: bytes) -> list[Event]:
        """The per-byte rules, with runs of "plain" bytes handled in bulk.

        A pattern can only complete at its last byte, and only the start and end chars change
        the framing state, so any run of bytes that are none of these just extends the window
        and the open frame (or is discarded outside one).
        """
        out: list[Event] = []
        find = self._special.search
        pos, n = 0, len(data)
        while pos < n:
            match = find(data, pos)
            stop = match.start() if match is not None else n
            if stop > pos:
                self._plain_run(data[pos:stop], out)
            if stop < n:
                self._byte(data[stop], out)
            pos = stop + 1
        return out

    def _plain_run(self, run: bytes, out: list[Event]) -> None:
        window = self._window
        window += run
        if len(window) > self._window_size:
            del window[: len(window) - self._window_size]
        frame = self._frame
        if frame is None:
            self.discarded_bytes += len(run)
            return
        # the run's byte that brings the frame to max_frame_size without ending it
        trigger = max(self.config.max_frame_size - len(frame) - 1, 0)
        if trigger < len(run):
            self._too_large(out)
            self.discarded_bytes += len(run) - trigger - 1
        else:
            frame += run

    def _byte(self, byte: int, out: list[Event]) -> None:
        if self._window_size:
            window = self._window
            window.append(byte)
            if len(window) > self._window_size:
                del window[0]
            for rule in self._rules:
                if window.endswith(rule.pattern):
                    out.append(Respond(rule.response))
        config = self.config
        if byte == config.start_byte:
            self._window.clear()
            self._oversize = False
            self._frame = bytearray((byte,))
            return
        frame = self._frame
        if frame is None:
            self.discarded_bytes += 1
            return
        frame.append(byte)
        if byte == config.end_byte:
            self._frame = None
            self._emit(bytes(frame), out)
        elif len(frame) >= config.max_frame_size:
            self._too_large(out)

    def _feed_fast(self, data: bytes) -> list[Event]:
        """The same rules without autoRespond, scanning with bytes.find instead of per byte."""
        out: list[Event] = []
        config = self.config
        start_b, end_b = config.start_byte, config.end_byte
        pos, n = 0, len(data)
        while pos < n:
            if self._oversize or self._frame is None:
                start = data.find(start_b, pos)
                if start < 0:
                    self.discarded_bytes += n - pos
                    return out
                self.discarded_bytes += start - pos
                self._oversize = False
                self._frame = bytearray((start_b,))
                pos = start + 1
                continue
            frame = self._frame
            end = data.find(end_b, pos)
            restart = data.find(start_b, pos, end if end >= 0 else n)
            stop = restart if restart >= 0 else (end if end >= 0 else n)
            # the byte that brings the frame to max_frame_size without ending it
            trigger = pos + max(config.max_frame_size - len(frame) - 1, 0)
            if trigger < stop:
                self._too_large(out)
                pos = trigger + 1
                continue
            if restart >= 0:
                self._frame = bytearray((start_b,))
                pos = restart + 1
                continue
            if end < 0:
                frame += data[pos:]
                return out
            frame += data[pos : end + 1]
            self._frame = None
            self._emit(bytes(frame), out)
            pos = end + 1
        return out

    def _too_large(self, out: list[Event]) -> None:
        out.append(FrameTooLarge(self.config.max_frame_size))
        self._frame = None
        self._oversize = True

    def _emit(self, frame: bytes, out: list[Event]) -> None:
        config = self.config
        out.append(Frame(filter_frame(frame, config.strip_sequences, config.strip_control_chars,
                                      config.keep_control_chars)))
