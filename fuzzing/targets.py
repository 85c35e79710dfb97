"""One fuzz property per decoder, shared by the Hypothesis suite (tests/fuzz/) and the atheris
harnesses (fuzzing/fuzz.py).

Theory of operation
-------------------
Each target takes one ``bytes`` input and checks, for that input, the decoder's contract:

* only the *documented* exceptions escape (listed in :data:`DOCUMENTED` per target; anything
  else propagates and is a finding);
* where a Cython twin exists, the pure and the Cython twin give the same result, or the same
  documented exception type;
* where the decoder is a stream decoder, the events do not depend on how the input is cut
  (the first bytes of the input choose the cut points, so a fuzzer explores cuts too);
* the answers the decoder produces are themselves well formed (ACKs parse, framed ACKs decode).

A violated property raises ``AssertionError`` (atheris reports it as a crash; Hypothesis
shrinks it). Nothing here does I/O: the decoders are sans-I/O, so a target is a pure function
of its input, which is what a coverage-guided fuzzer needs.

Invariant: every target returns normally for every input on a correct decoder.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from typing import Any

from medagent.channels.endpoint import MllpOptions
from medagent.cloud import messages as m
from medagent.proto import agent_session as ags
from medagent.proto import astm, bytestream, hl7, mllp
from medagent.proto.ackpolicy import AckMode
from medagent.proto.hl7_session import FramingError, Hl7Session, Rejected, Slot
from medagent.records import CommitResult

#: The exceptions each target's decoder documents (its module docstring); anything else escaping
#: is a defect.
DOCUMENTED: dict[str, tuple[type[BaseException], ...]] = {
    "mllp": (mllp.FrameTooLarge,),  # MllpDecoder.feed: only FrameTooLarge, carrying earlier frames
    "hl7_header": (hl7.Hl7Error,),  # parse_header / decode / build_ack / parse_ack: no readable MSH,
    #                                 unknown charset, undecodable text; split_segments: none
    "hl7_session": (),  # Hl7Session.receive_frame/committed/data_to_send: never raise
    "agent_messages": (m.ProtocolError,),  # messages.decode: ProtocolError (UnknownMessageType)
    "agent_session": (),  # AgentSession/HubSession.receive_frame: never raise (agent:error out)
    "astm": (),  # AstmLink.feed/commit_done/on_timer, parse_records, header_identity: never raise
    "bytestream": (),  # ByteStreamFramer.feed: never raises
}

TS = "20240102030405"  # fixed MSH-7 and MSH-10 so that ACKs of the two twins compare byte for byte
CID = "FUZZ0001"


# ------------------------------------------------------------------------------------- helpers


def cuts(data: bytes) -> tuple[list[int], bytes]:
    """Split the fuzz input into chunk sizes (from its first byte(s)) and the stream itself."""
    if not data:
        return [], b""
    count = data[0] % 8
    sizes = [1 + b % 64 for b in data[1 : 1 + count]]
    return sizes, data[1 + count :]


def chunked(stream: bytes, sizes: list[int]) -> Iterator[bytes]:
    """`stream` cut at `sizes` (cycled), the rest in one piece."""
    pos = 0
    for size in sizes:
        if pos >= len(stream):
            return
        yield stream[pos : pos + size]
        pos += size
    if pos < len(stream):
        yield stream[pos:]


def outcome(function: Callable[..., Any], documented: tuple[type[BaseException], ...], *args: Any) -> Any:
    """("ok", comparable result) or ("error", exception type) for a documented exception."""
    try:
        result = function(*args)
    except documented as exc:
        return "error", type(exc).__name__
    if hasattr(result, "as_dict"):
        return "ok", result.as_dict()
    return "ok", result


# ------------------------------------------------------------------------------------- MLLP


def _mllp_events(cls: type, chunks: list[bytes], max_frame_size: int) -> list[tuple[Any, ...]]:
    """Flattened events of one decoder over `chunks` (frames, oversize heads, final counters)."""
    decoder = cls(max_frame_size)
    events: list[tuple[Any, ...]] = []
    for chunk in [*chunks, b""]:
        data = chunk
        for _ in range(len(chunk) + 2):  # bounded: each FrameTooLarge consumes at least one byte
            try:
                events += [("frame", f) for f in decoder.feed(data)]
                break
            except mllp.FrameTooLarge as exc:
                events += [("frame", f) for f in exc.frames]
                events.append(("oversize", exc.head))
                data = b""
        else:
            raise AssertionError("FrameTooLarge raised more often than bytes were fed")
    events.append(("counters", decoder.discarded_bytes, decoder.missing_cr, decoder.truncated_frames))
    return events


def mllp_target(data: bytes) -> None:
    """MLLP decoder: chunking invariance, both twins equal, only FrameTooLarge escapes."""
    sizes, stream = cuts(data)
    limit = 16 + (data[0] if data else 0)  # small limits exercise the oversize path
    whole = _mllp_events(mllp.MllpDecoderPy, [stream], limit)
    assert _mllp_events(mllp.MllpDecoderPy, list(chunked(stream, sizes)), limit) == whole
    if mllp.MllpDecoderC is not None:
        assert _mllp_events(mllp.MllpDecoderC, list(chunked(stream, sizes)), limit) == whole
    for event in whole:
        if event[0] == "frame":
            assert b"\x0b" not in event[1] and b"\x1c" not in event[1]
    payload = stream.replace(b"\x0b", b"").replace(b"\x1c", b"")
    assert mllp.MllpDecoderPy(len(payload) + 1).feed(mllp.encode(payload)) == [payload]  # round trip


# ------------------------------------------------------------------------------------- HL7


def _hl7_calls(data: bytes) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """(kernel name, args, kwargs) of every HL7 kernel call made on one input."""
    fixed = {"timestamp": TS, "control_id": CID}
    return [("parse_header", (data,), {}), ("split_segments", (data,), {}), ("decode", (data,), {}),
            ("build_ack", (data, "AA"), fixed), ("build_ack", (data, "AE", "t|^~", "e\r\n"), fixed)]


def hl7_target(data: bytes) -> None:
    """HL7 header/segments/decode/ACK build and parse: twins equal, only Hl7Error escapes."""
    documented = DOCUMENTED["hl7_header"]
    for name, args, kwargs in _hl7_calls(data):
        py = outcome(functools.partial(getattr(hl7, name + "Py"), *args, **kwargs), documented)
        if hl7.parse_headerC is not None:
            c = outcome(functools.partial(getattr(hl7, name + "C"), *args, **kwargs), documented)
            assert py == c, (name, py, c)
        if name == "build_ack" and py[0] == "ok":
            # an ACK we build must be readable by our own ACK reader, acknowledging MSH-10
            info = hl7.parse_ackPy(py[1])
            assert info is not None and info.code == args[1], info
            assert info.control_id == hl7.parse_headerPy(data).control_id, (info, data)
    for form in (data, data.decode("latin-1")):
        parsed = outcome(hl7.parse_ackPy, documented, form)
        if parsed[0] == "ok" and parsed[1] is not None:
            assert isinstance(parsed[1].code, str)
        if hl7.parse_ackC is not None:
            assert outcome(hl7.parse_ackC, documented, form) == parsed, (form, parsed)


# ------------------------------------------------------------------------------------- HL7 session


_MODES = (AckMode.FAST, AckMode.ORIGINAL, AckMode.IMMEDIATE, AckMode.TWO_PHASE)


def hl7_session_target(data: bytes) -> None:
    """HL7 session core: any frames, any commit outcomes; never raises, ACKs parse, in order."""
    if not data:
        return
    mode = _MODES[data[0] % len(_MODES)]
    session = Hl7Session(MllpOptions(ack_mode=mode, response_timeout_s=1.0, assign_seq_no=bool(data[0] & 8)),
                         channel="fuzz", remote="127.0.0.1:1")
    frames = [f for f in data[1:].split(b"\x1c") if f] or [data[1:]]
    now = 0.0
    out = bytearray()
    for index, frame in enumerate(frames):
        now += 0.25
        result = session.receive_frame(bytes(frame), now, 1700000000.0)
        assert isinstance(result, (Slot, Rejected, FramingError)), result
        if isinstance(result, Slot) and result.record is not None:
            outcome_of_commit = CommitResult(index + 1) if index % 3 else CommitResult(None, error="storage error")
            session.committed(result, outcome_of_commit)
            if mode is AckMode.ORIGINAL and index % 2:
                session.reply(result.control_id, "MSH|^~\\&|B|B|A|A|1||ACK|1|P|2.5\rMSA|AA|x\r", 200, now)
        session.expire(now + 2.0)
        out += session.data_to_send(now + 2.0)
    session.close()
    for ack in mllp.MllpDecoderPy().feed(bytes(out)):
        info = hl7.parse_ackPy(ack)
        assert info is not None, "an ACK without MSA"


# ------------------------------------------------------------------------------------- agent protocol


def agent_messages_target(data: bytes) -> None:
    """messages.decode: only ProtocolError escapes; whatever decodes, encodes and decodes equal."""
    for receiver in ("agent", "hub"):
        try:
            message = m.decode(data, receiver)  # type: ignore[arg-type]
        except m.ProtocolError:
            continue
        again = m.decode(m.encode(message), receiver)  # type: ignore[arg-type]
        assert again == message, (message, again)


def _sent(session: ags.AgentSession | ags.HubSession) -> list[dict[str, Any]]:
    """What the session writes: each frame must be a message its peer decodes."""
    peer = "hub" if isinstance(session, ags.AgentSession) else "agent"
    frames = session.data_to_send()
    for frame in frames:
        m.decode(frame, peer)  # type: ignore[arg-type]  # ProtocolError here is a finding
    return [json.loads(frame) for frame in frames]


def agent_session_target(data: bytes) -> None:
    """Both session ends: any frame sequence never raises; a Violation is answered with
    agent:error; everything either end writes decodes at its peer."""
    frames = data.split(b"\n")
    agent = ags.AgentSession(version="fuzz", now=0.0, heartbeat_s=1.0)
    agent.connect("token", "agent-1")
    _sent(agent)
    hub = ags.HubSession(version="fuzz", now=0.0, heartbeat_s=1.0)
    for index, frame in enumerate(frames):
        if index == 1:  # the later frames reach a live agent
            agent.receive_frame(m.encode(m.ConnectResponse(features={"batch": {"maxMessages": 10}})))
        for session in (agent, hub):
            if session.closed:
                continue
            events = session.receive_frame(frame)
            for event in events:
                if isinstance(event, ags.ConnectRequested):
                    hub.accept("agent-1", {"batch": {}}, event.callback)
            answers = _sent(session)
            if any(isinstance(event, ags.Violation) for event in events):
                assert any(a.get("type") == "agent:error" for a in answers), answers
        agent.tick(float(index))
        hub.tick(float(index))
        _sent(agent)
        _sent(hub)


# ------------------------------------------------------------------------------------- ASTM


def _astm_events(chunks: list[bytes]) -> list[Any]:
    link = astm.AstmLink(max_frame_size=64, max_message_size=512)
    events: list[Any] = []
    now = 0.0
    for chunk in chunks:
        now += 0.001  # far below every timer: events must not depend on the cut
        pending = link.feed(chunk, now)
        for _ in range(4 * len(chunk) + 8):  # bounded: a few events per byte at most
            if not pending:
                break
            event = pending.pop(0)
            events.append(event)
            if isinstance(event, astm.MessageReceived) and event.complete:
                # bytes held while committing are processed inside commit_done, so its events
                # (maybe the next message) join the same sequence
                pending[:0] = link.commit_done(event.token, ok=event.token % 3 != 0, now=now)
        else:
            raise AssertionError("more events than a chunk can produce")
    events += link.on_timer(now + 100.0)
    events += link.connection_lost(now + 100.0)
    events.append(("noise", link.noise_bytes))
    return events


def astm_target(data: bytes) -> None:
    """ASTM link (receiver side) and records: chunking invariance, nothing escapes."""
    sizes, stream = cuts(data)
    whole = _astm_events([stream])
    assert _astm_events(list(chunked(stream, sizes))) == whole
    for event in whole:
        if isinstance(event, astm.Write):
            assert event.data in (b"\x06", b"\x15", b"\x04", b"\x05"), event  # ACK NAK EOT ENQ only
        if isinstance(event, astm.MessageReceived):
            records = astm.parse_records(event.body)
            astm.header_identity(records)
    records = astm.parse_records(stream)
    astm.header_identity(records)
    for record in records:
        record.field(3)
        record.components(5)


# ------------------------------------------------------------------------------------- byte stream


def _bytestream_config(head: bytes) -> bytestream.ByteStreamConfig:
    start, end = head[0], head[1]
    if start == end:
        end = (end + 1) % 256
    rules = ()
    if head[2] & 1:
        rules = (bytestream.AutoRespondRule(bytes([head[3]]), b"\x06"),
                 bytestream.AutoRespondRule(bytes([head[3], head[4]]), b"\x15"))
    return bytestream.ByteStreamConfig(
        start_byte=start, end_byte=end, auto_respond=rules,
        strip_sequences=(bytes([head[4]]), bytes([head[4], head[5]])) if head[2] & 2 else (),
        strip_control_chars=bool(head[2] & 4), keep_control_chars=frozenset({head[5] % 32}),
        max_frame_size=1 + head[5] % 48,
    )


def _bytestream_events(config: bytestream.ByteStreamConfig, chunks: list[bytes]) -> list[Any]:
    framer = bytestream.ByteStreamFramer(config)
    events: list[Any] = []
    for chunk in chunks:
        events += framer.feed(chunk)
        assert framer.pending_bytes <= config.max_frame_size
    return [*events, ("discarded", framer.discarded_bytes)]


def bytestream_target(data: bytes) -> None:
    """Byte-stream framing: chunking invariance, bounded buffer, nothing escapes."""
    if len(data) < 6:
        return
    config = _bytestream_config(data[:6])
    sizes, stream = cuts(data[6:])
    whole = _bytestream_events(config, [stream])
    assert _bytestream_events(config, list(chunked(stream, sizes))) == whole


TARGETS: dict[str, Callable[[bytes], None]] = {
    "mllp": mllp_target,
    "hl7_header": hl7_target,
    "hl7_session": hl7_session_target,
    "agent_messages": agent_messages_target,
    "agent_session": agent_session_target,
    "astm": astm_target,
    "bytestream": bytestream_target,
}
