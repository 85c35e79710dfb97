"""Hypothesis fuzzing of every decoder, through the properties in fuzzing/targets.py.

Per decoder: structured near-valid inputs (tests/fuzz/strategies.py), mutated, and for stream
decoders cut at random places. The properties (see fuzzing/targets.py): the pure and Cython
twins agree where both exist, stream events do not depend on chunking, answers are well formed,
and only the documented exceptions escape:

=================  ==========================================================================
target             documented exceptions
=================  ==========================================================================
mllp               FrameTooLarge (MllpDecoder.feed)
hl7_header         Hl7Error (parse_header, decode, build_ack, parse_ack; split_segments none)
hl7_session        none (Hl7Session.receive_frame / committed / reply / expire / data_to_send)
agent_messages     ProtocolError incl. UnknownMessageType (messages.decode)
agent_session      none (AgentSession / HubSession.receive_frame, tick)
astm               none (AstmLink.feed / commit_done / on_timer, parse_records)
bytestream         none (ByteStreamFramer.feed)
=================  ==========================================================================

Each property runs twice: the CI form (a modest number of examples) and a `long` form (20,000
examples, MEDAGENT_LONG_TESTS=1). The HL7 session core runs with the pure and the Cython
header/ACK kernels (`impl`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import strategies as s
import targets
from fuzzsupport import fuzz_pair
from hypothesis import strategies as st
from testsupport import pick

from medagent.proto import hl7 as hl7proto


def test_documented_exceptions_cover_every_target() -> None:
    assert set(targets.DOCUMENTED) == set(targets.TARGETS)


test_mllp, test_mllp_long = fuzz_pair(s.MLLP, targets.mllp_target)
test_hl7, test_hl7_long = fuzz_pair(st.one_of(s.HL7, st.binary(max_size=200)), targets.hl7_target, ci=300)
test_agent_messages, test_agent_messages_long = fuzz_pair(s.AGENT_FRAME, targets.agent_messages_target, ci=300)
test_agent_session, test_agent_session_long = fuzz_pair(s.AGENT_FRAMES, targets.agent_session_target)
test_astm, test_astm_long = fuzz_pair(s.ASTM, targets.astm_target)
test_bytestream, test_bytestream_long = fuzz_pair(s.BYTESTREAM, targets.bytestream_target)


@pytest.fixture
def kernels(impl: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The session core with the pure or the Cython header/ACK kernels."""
    for name in ("parse_header", "build_ack", "decode"):
        monkeypatch.setattr(hl7proto, name, pick(hl7proto, name, impl))
    yield


_session_ci, _session_long = fuzz_pair(s.SESSION, targets.hl7_session_target)


@pytest.mark.usefixtures("kernels")
def test_hl7_session() -> None:
    _session_ci()


@pytest.mark.long
@pytest.mark.usefixtures("kernels")
def test_hl7_session_long() -> None:
    _session_long()


def test_strategies_reach_deep_states() -> None:
    """The strategies reach what random bytes do not (a readable MSH, a complete ASTM message, a
    decodable agent frame): `find` fails the test if no such input is generated."""
    from hypothesis import find

    find(s.hl7_messages(), lambda b: _parses(b))
    find(s.ASTM, lambda b: any(type(e).__name__ == "MessageReceived" for e in targets._astm_events([targets.cuts(b)[1]])))
    find(s.AGENT_FRAME, lambda b: _decodes(b))


def _parses(data: bytes) -> bool:
    try:
        hl7proto.parse_headerPy(data)
    except hl7proto.Hl7Error:
        return False
    return True


def _decodes(data: bytes) -> bool:
    from medagent.cloud import messages as m

    try:
        m.decode(data, "hub")
    except m.ProtocolError:
        return False
    return True
