"""Differential and chunking-invariance tests of the MLLP decoder twins (hypothesis).

Streams are built from valid frames, junk, frames whose EB lacks the CR, truncated frames (a new
SB before the EB) and oversize frames, then cut at random chunk boundaries. Checked:
* the pure and Cython twins agree exactly, call by call (frames, FrameTooLarge with its frames,
  head and limit, every counter after every call);
* for either twin, the flattened event sequence and the final counters for any chunking equal
  those for the whole stream fed at once.
"""

from __future__ import annotations

from typing import Any

import pytest
from testsupport import pick
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medagent import _compat
from medagent.proto import mllp
from medagent.proto.mllp import FrameTooLarge

SB, EB, CR = b"\x0b", b"\x1c", b"\r"
SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

Event = tuple[Any, ...]


def _payloads(min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    """Payloads without SB/EB, biased towards bytes that matter to the scanner (CR, NUL)."""
    byte = st.one_of(st.sampled_from(b"\r\n\x00|^~\\&AZ"), st.integers(0, 255))
    raw = st.lists(byte, min_size=min_size, max_size=max_size).map(bytes)
    return raw.map(lambda b: b.replace(SB, b"a").replace(EB, b"b"))


#: Stray bytes between frames; also what follows an EB that lacks its CR.
_STRAY = st.sampled_from([b"", b"\r", b"\n", b"\x00", b" ", EB, SB, CR + CR, b"\x00\x0b"])


def _parts(max_frame_size: int) -> st.SearchStrategy[bytes]:
    near_limit = _payloads(max(0, max_frame_size - 2), max_frame_size + 2)
    return st.one_of(
        _payloads(0, 40).map(mllp.encode),  # valid frame
        near_limit.map(mllp.encode),  # valid or oversize, right at the limit
        _payloads(max_frame_size + 1, 3 * max_frame_size).map(mllp.encode),  # oversize
        st.tuples(_payloads(0, 20), _STRAY).map(lambda t: SB + t[0] + EB + t[1]),  # EB, no CR
        _payloads(0, 20).map(lambda p: SB + p),  # truncated by whatever follows
        st.binary(max_size=6),  # junk (may hold SB, EB, CR, NUL)
        _STRAY,
    )


@st.composite
def streams(draw: st.DrawFn) -> tuple[int, bytes, list[bytes]]:
    """(max_frame_size, stream, chunks) with random cut points."""
    max_frame_size = draw(st.sampled_from([1, 2, 5, 16, 64]))
    stream = b"".join(draw(st.lists(_parts(max_frame_size), max_size=12)))
    cuts = sorted(draw(st.sets(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:])]
    return max_frame_size, stream, chunks


def counters(decoder: Any) -> tuple[int, ...]:
    return (
        decoder.discarded_bytes,
        decoder.missing_cr,
        decoder.truncated_frames,
        decoder.frames_decoded,
        decoder.pending_bytes,
    )


def feed_all(decoder: Any, chunks: list[bytes]) -> list[Event]:
    """Feed every chunk, continuing with feed(b"") after each FrameTooLarge.

    Returns one event per feed() call: ("frames", frames, counters) or
    ("error", limit, frames, head, counters).
    """
    events: list[Event] = []
    budget = sum(len(c) for c in chunks) + 2 * len(chunks) + 2  # each error consumes >= 1 byte
    for chunk in chunks:
        data = chunk
        while True:
            budget -= 1
            assert budget >= 0, "decoder keeps raising without consuming input"
            try:
                frames = decoder.feed(data)
            except FrameTooLarge as exc:
                events.append(("error", exc.limit, exc.frames, exc.head, counters(decoder)))
                data = b""
                continue
            events.append(("frames", frames, counters(decoder)))
            break
    return events


def flatten(events: list[Event]) -> list[Event]:
    """The chunking-independent view: each frame, and each rejection with its head."""
    flat: list[Event] = []
    for event in events:
        if event[0] == "error":
            _, limit, frames, head, _ = event
            flat += [("frame", f) for f in frames]
            flat.append(("too-large", limit, head))
        else:
            flat += [("frame", f) for f in event[1]]
    return flat


@SETTINGS
@given(case=streams())
def test_chunking_does_not_change_output(impl: str, case: tuple[int, bytes, list[bytes]]) -> None:
    max_frame_size, stream, chunks = case
    decoder_cls = pick(mllp, "MllpDecoder", impl)
    whole, chunked = decoder_cls(max_frame_size), decoder_cls(max_frame_size)
    assert flatten(feed_all(chunked, chunks)) == flatten(feed_all(whole, [stream]))
    assert counters(chunked) == counters(whole)


@pytest.mark.skipif(_compat.NO_EXTENSIONS, reason="pure mode (MEDAGENT_NO_EXTENSIONS) in force")
@SETTINGS
@given(case=streams(), resets=st.sets(st.integers(0, 12), max_size=2))
def test_twins_agree_call_by_call(case: tuple[int, bytes, list[bytes]], resets: set[int]) -> None:
    max_frame_size, _, chunks = case
    py = pick(mllp, "MllpDecoder", "py")(max_frame_size)
    c = pick(mllp, "MllpDecoder", "c")(max_frame_size)
    for index, chunk in enumerate(chunks):
        assert feed_all(c, [chunk]) == feed_all(py, [chunk])
        if index in resets:
            py.reset()
            c.reset()
            assert counters(c) == counters(py)
    assert counters(c) == counters(py)
    assert c.max_frame_size == py.max_frame_size == max_frame_size


def test_frames_of_random_streams_match_reference_parser() -> None:
    """Sanity check of the generator against a tiny independent parser (valid frames only)."""
    payloads = [b"", b"a\rb", b"\x00" * 3, b"MSH|x"]
    stream = b" \x00".join(mllp.encode(p) for p in payloads)
    reference = [part.split(EB)[0] for part in stream.split(SB)[1:]]
    assert feed_all(mllp.MllpDecoderPy(), [stream])[0][1] == reference == payloads
