"""Structured inputs for the decoders: near-valid messages, frames and streams, then mutated.

Random bytes alone rarely get past an MSH check or a checksum; these strategies build the
well-formed thing first (HL7 messages with random separators, charsets and truncation; MLLP and
ASTM frames; agent protocol JSON with right and wrong field types) and let `mutated` break it.
"""

from __future__ import annotations

import json

from fuzzsupport import mutated, with_cuts
from hypothesis import strategies as st

from medagent.cloud import messages as m
from medagent.proto import astm

PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
CHARSETS = ["", "UNICODE UTF-8", "8859/1", "ASCII", "KLINGON", "~ISO IR87", "UNICODE UTF-16", "GB 18030",
            "ISO IR87", "CNS 11643-1992", "UNICODE UTF-32", "8859/15~ISO IR87"]
_TEXT = st.text(st.sampled_from("AZaz09 ^~\\&|#\r\n\x00éÄ\u4e2d"), max_size=12)


@st.composite
def hl7_messages(draw: st.DrawFn) -> bytes:
    """An HL7 message: random separators, MSH fields, charset, terminators, BOM, wide encodings."""
    field = draw(st.sampled_from(PUNCTUATION))
    encoding = draw(st.one_of(st.just("^~\\&"), st.text(st.sampled_from(PUNCTUATION), max_size=6)))
    fields = [draw(_TEXT) for _ in range(8)]
    control_id = draw(st.text(st.sampled_from("AZ09-_"), max_size=22))
    charset = draw(st.sampled_from(CHARSETS))
    msh = [f"MSH{field}{encoding}", *fields[:5], "ADT^A01^ADT_A01", control_id, "P", "2.5.1", "", "",
           draw(st.sampled_from(["", "AL", "NE", "ER", "SU", "XX"])), draw(st.sampled_from(["", "AL", "NE"])),
           "", charset]
    msh = msh[: draw(st.integers(9, len(msh)))]
    terminator = draw(st.sampled_from(["\r", "\n", "\r\n"]))
    text = field.join(msh) + terminator + terminator.join(
        f"{seg}{field}{draw(_TEXT)}" for seg in draw(st.lists(st.sampled_from(["PID", "EVN", "MSA", "OBX"]), max_size=4)))
    codec = draw(st.sampled_from(["latin-1", "utf-8", "utf-16", "utf-16-le", "utf-32"]))
    data = text.encode(codec, errors="replace")
    prefix = draw(st.sampled_from([b"", b"\xef\xbb\xbf", b" \r\n\t", b"\x0b"]))
    return prefix + data if codec in ("latin-1", "utf-8") else data


HL7 = mutated(hl7_messages())

_JUNK = st.sampled_from([b"", b"\r", b"\n", b"\x00", b" ", b"\x1c", b"\x0b", b"\r\r", b"\x00\x0b", b"junk"])


@st.composite
def mllp_streams(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        payload = draw(st.one_of(hl7_messages(), st.binary(max_size=300))).replace(b"\x0b", b"a").replace(b"\x1c", b"b")
        kind = draw(st.sampled_from(["frame", "frame", "no-cr", "truncated", "junk"]))
        if kind == "frame":
            parts.append(b"\x0b" + payload + b"\x1c\r")
        elif kind == "no-cr":
            parts.append(b"\x0b" + payload + b"\x1c" + draw(_JUNK))
        elif kind == "truncated":
            parts.append(b"\x0b" + payload[: len(payload) // 2])
        else:
            parts.append(draw(_JUNK))
    return b"".join(parts)


MLLP = with_cuts(mutated(mllp_streams()))


@st.composite
def session_inputs(draw: st.DrawFn) -> bytes:
    """Mode byte, then frames separated by FS (how hl7_session_target splits its input)."""
    frames = draw(st.lists(st.one_of(HL7, st.binary(max_size=40)), min_size=1, max_size=6))
    return bytes([draw(st.integers(0, 255))]) + b"\x1c".join(f.replace(b"\x1c", b"") for f in frames)


SESSION = session_inputs()

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=8), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_FIELD_NAMES = ["callback", "accessToken", "agentId", "channel", "remote", "contentType", "body", "statusCode",
                "returnAck", "seq", "messages", "features", "duplicateOf", "noReply", "version", "type", "logs", "stats"]


@st.composite
def agent_frames(draw: st.DrawFn) -> bytes:
    """A JSON object with a real (or legacy, or unknown) type and right, wrong or missing fields."""
    message_type = draw(st.sampled_from([*m.MESSAGE_TYPES, "connected", "push", "transmit", "agent:nope", ""]))
    document: dict[str, object] = {"type": message_type}
    for name in draw(st.lists(st.sampled_from(_FIELD_NAMES), max_size=8, unique=True)):
        if name == "messages":
            document[name] = draw(st.lists(st.builds(lambda c: {"type": "agent:transmit:request", "callback": c,
                                                               "channel": "a", "remote": "r", "contentType": "c",
                                                               "body": "b"}, st.text(max_size=3)), max_size=3))
        else:
            document[name] = draw(st.one_of(_VALUES, st.text(max_size=8)))
    top = draw(st.sampled_from(["object", "object", "object", "array", "scalar"]))
    if top == "array":
        return json.dumps([document]).encode()
    if top == "scalar":
        return json.dumps(draw(_VALUES)).encode()
    return json.dumps(document).encode()


AGENT_FRAME = mutated(agent_frames())
AGENT_FRAMES = st.lists(st.one_of(agent_frames(), AGENT_FRAME), min_size=1, max_size=8).map(b"\n".join)

_RECORDS = st.lists(st.sampled_from([b"H|\\^&|||LIS^1|||||||P|1", b"P|1||PID1", b"O|1|S1||^^^GLU", b"R|1|^^^GLU|5.4|mmol/L",
                                     b"C|1|L|note", b"L|1|N", b"Q|1|^S1", b"R|2|^^^NA|" + b"9" * 300]), min_size=1, max_size=6)


@st.composite
def astm_streams(draw: st.DrawFn) -> bytes:
    """ENQ, the frames of one or two E1394 messages (sometimes corrupted or repeated), EOT."""
    parts = []
    for _ in range(draw(st.integers(1, 2))):
        parts.append(b"\x05")
        frames = astm.frames_for_message(b"\r".join(draw(_RECORDS)))
        for frame in frames:
            parts.append(frame)
            if draw(st.integers(0, 9)) == 0:
                parts.append(frame)  # a retransmission (the sender missed our ACK)
        parts.append(draw(st.sampled_from([b"\x04", b"", b"\x04\x04", b"noise"])))
    return b"".join(parts)


ASTM = with_cuts(mutated(astm_streams()))

_STREAM_BYTES = st.lists(st.one_of(st.sampled_from(b"\x0b\x1c\x0d\x02\x03\x05\x06\x00\x1f"), st.integers(0, 255)),
                         max_size=300).map(bytes)
BYTESTREAM = st.tuples(st.binary(min_size=6, max_size=6), with_cuts(_STREAM_BYTES)).map(lambda t: t[0] + t[1])
