"""Kernel micro-benchmarks: pure-Python twins against Cython twins, in the same run.

What is measured (the per-message hot path of an HL7 channel, DESIGN.md "Data flow"):

* ``test_pipeline_*``: MLLP decode + MSH scan (reading MSH-10, as the queue does) + ACK build
  with the default (current) timestamp and a generated control id, per message, with one frame
  per chunk (lock-step senders) and 64 frames per chunk (pipelined senders, bulk replays).
* one benchmark per kernel: ``MllpDecoder.feed`` (1 and 64 frames per chunk), ``parse_header``,
  ``build_ack``, ``split_segments``, and ``parse_ack`` on a bot's reply as the agent receives it
  (text: the ACK of the same message).

Every benchmark stores ``extra_info["per_message_ns"]`` (mean time divided by the messages in
one call), and the session ends with a table of the Cython speed-up per benchmark (target:
>= 10x, DESIGN.md "Performance targets"). The message is the 625-byte ADT^A01
(tests/data/adt_a01.hl7).

Run: ``pytest benchmarks/test_kernels.py --benchmark-group-by=func`` (add
``MEDAGENT_NO_EXTENSIONS=1`` to see the pure twins alone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import pick, record_per_message

from medagent.proto import hl7, mllp

BATCH = 64


def _framed(message: bytes) -> bytes:
    return mllp.encode(message)


def _measure(benchmark: Any, name: str, impl: str, work: Callable[[], object], messages: int) -> None:
    benchmark.group = name
    benchmark(work)
    record_per_message(benchmark, name, impl, messages)


def _pipeline(impl: str) -> Callable[[bytes], int]:
    decoder = pick(mllp, "MllpDecoder", impl)()
    parse_header = pick(hl7, "parse_header", impl)
    build_ack = pick(hl7, "build_ack", impl)

    def handle(chunk: bytes) -> int:
        acks = 0
        for frame in decoder.feed(chunk):
            if parse_header(frame).control_id:
                acks += len(build_ack(frame, "AA"))
        return acks

    return handle


@pytest.mark.parametrize("frames_per_chunk", [1, BATCH])
def test_pipeline(benchmark: Any, impl: str, adt_a01: bytes, frames_per_chunk: int) -> None:
    handle = _pipeline(impl)
    chunk = _framed(adt_a01) * frames_per_chunk
    assert handle(chunk) > 0
    _measure(benchmark, f"pipeline[{frames_per_chunk} frame(s)/chunk]", impl,
             lambda: handle(chunk), frames_per_chunk)


@pytest.mark.parametrize("frames_per_chunk", [1, BATCH])
def test_mllp_feed(benchmark: Any, impl: str, adt_a01: bytes, frames_per_chunk: int) -> None:
    decoder = pick(mllp, "MllpDecoder", impl)()
    chunk = _framed(adt_a01) * frames_per_chunk
    assert len(decoder.feed(chunk)) == frames_per_chunk
    _measure(benchmark, f"mllp_feed[{frames_per_chunk} frame(s)/chunk]", impl,
             lambda: decoder.feed(chunk), frames_per_chunk)


def test_parse_header(benchmark: Any, impl: str, adt_a01: bytes) -> None:
    parse_header = pick(hl7, "parse_header", impl)
    assert parse_header(adt_a01).control_id
    _measure(benchmark, "parse_header(+MSH-10)", impl, lambda: parse_header(adt_a01).control_id, 1)


def test_build_ack(benchmark: Any, impl: str, adt_a01: bytes) -> None:
    build_ack = pick(hl7, "build_ack", impl)
    assert b"MSA|AA|" in build_ack(adt_a01, "AA")
    _measure(benchmark, "build_ack", impl, lambda: build_ack(adt_a01, "AA"), 1)


def test_split_segments(benchmark: Any, impl: str, adt_a01: bytes) -> None:
    split_segments = pick(hl7, "split_segments", impl)
    assert len(split_segments(adt_a01)) > 3
    _measure(benchmark, "split_segments", impl, lambda: split_segments(adt_a01), 1)


def test_parse_ack(benchmark: Any, impl: str, adt_a01: bytes) -> None:
    parse_ack = pick(hl7, "parse_ack", impl)
    reply = hl7.build_ack(adt_a01, "AA").decode("latin-1")
    assert parse_ack(reply).code == "AA"
    _measure(benchmark, "parse_ack(text)", impl, lambda: parse_ack(reply), 1)
