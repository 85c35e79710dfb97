"""ACK sequencer micro-benchmarks: the pure Hl7Session against its Cython twin, in the same run.

What is measured: the session calls one accepted message makes on an HL7 channel
(medagent.channels.hl7): ``receive_frame`` -> the sink's commit callback ``slot.committed`` ->
``data_to_send(now)``, plus ``reply`` in the modes that wait for the bot (ORIGINAL: the reply is
the ACK; TWO_PHASE: CA, then the forwarded AA). The frame is the 625-byte ADT^A01, decoded
already (the MLLP decoder is benchmarked in test_kernels.py).

Both twins run with the Cython header/ACK kernels when extensions are built (the pure session
calls them through medagent.proto.hl7; the Cython session calls them directly), so the "py" row
is the sequencer as it ran before it had a twin, and the speed-up is the session layer's alone.

Every benchmark stores ``extra_info["per_message_ns"]``; the session ends with the pure/Cython
table (target for this layer: >= 3x, issue 19).

Run: ``pytest benchmarks/test_session.py --benchmark-group-by=func``.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import pick, record_per_message

from medagent.channels.endpoint import MllpOptions
from medagent.proto import hl7_session
from medagent.proto.ackpolicy import AckMode
from medagent.records import CommitResult

STORED = CommitResult(1)
REPLY = "MSH|^~\\&|BOT|HUB|LAB|HOSP|20240101120000||ACK^A01|R1|P|2.5.1\rMSA|AA|{id}\r"


def _cycle(impl: str, mode: AckMode, message: bytes) -> Any:
    session_cls = pick(hl7_session, "Hl7Session", impl)
    counters = pick(hl7_session, "Hl7Counters", impl)((1.0, 10.0, 100.0, float("inf")))
    session = session_cls(MllpOptions(ack_mode=mode, response_timeout_s=10.0), channel="adt", remote="10.0.0.1:1",
                          counters=counters)
    reply = REPLY.format(id="ADT1") if mode in (AckMode.ORIGINAL, AckMode.TWO_PHASE) else None

    def one_message() -> int:
        slot = session.receive_frame(message, 1.0, 1700000000.0)
        slot.committed(STORED)
        if reply is not None:
            session.reply(slot.control_id, reply, 200, 1.0)
        return len(session.data_to_send(1.001))

    return one_message


@pytest.mark.parametrize("mode", [AckMode.FAST, AckMode.TWO_PHASE, AckMode.ORIGINAL, AckMode.IMMEDIATE],
                         ids=lambda mode: mode.value)
def test_session_cycle(benchmark: Any, impl: str, adt_a01: bytes, mode: AckMode) -> None:
    one_message = _cycle(impl, mode, adt_a01)
    assert one_message() > 0  # an ACK (or CA + AA) is written for every message
    name = f"session[{mode.value}]"
    benchmark.group = name
    benchmark(one_message)
    record_per_message(benchmark, name, impl, 1)
