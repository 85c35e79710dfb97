"""AgentSession encodes a transmit when it is queued (so a sender can spread a large batch over
several loop turns and the write only frames it), and the frames are what encoding at the write
would give: the token of the write, in queue order, cut at the same limits."""

from __future__ import annotations

import orjson

from medagent.cloud import messages as m
from medagent.proto.agent_session import AgentSession, BatchSettings


def live_session(batching: bool, max_messages: int = 1000) -> AgentSession:
    session = AgentSession(version="v", now=0.0, batching=BatchSettings(batching, max_messages, 1 << 20))
    session.connect("tok-1", "agent-1")
    session.data_to_send()
    session.receive_frame(orjson.dumps({"type": "agent:connect:response", "features": {"batch": {}}}))
    assert session.live
    return session


def transmit(n: int) -> m.TransmitRequest:
    return m.TransmitRequest(remote="r", content_type=m.CONTENT_TYPE_HL7_V2, body=f"MSH|{n}", channel="c",
                             callback=f"Agent/agent-1-{n}")


def tokens_and_callbacks(frames: list[bytes]) -> list[tuple[str, str]]:
    out = []
    for frame in frames:
        data = orjson.loads(frame)
        for item in data.get("messages", [data]):
            out.append((item["accessToken"], item["callback"]))
    return out


def test_batch_frames_carry_the_token_of_the_write_even_when_it_changed_midway() -> None:
    session = live_session(True, max_messages=3)
    for n in range(2):
        session.send_transmit(transmit(n))
    session.access_token = "tok-2"  # refreshed between two sends
    for n in range(2, 5):
        session.send_transmit(transmit(n))
    session.access_token = "tok-3"  # and again before the write
    frames = session.data_to_send()
    assert len(frames) == 2  # cut at max_messages, as before
    assert tokens_and_callbacks(frames) == [("tok-3", f"Agent/agent-1-{n}") for n in range(5)]
    assert session.unconfirmed_count() == 5


def test_plain_frames_are_the_queued_encodings_when_the_token_did_not_change() -> None:
    session = live_session(False)
    session.send_transmit(transmit(0))
    assert session.queued_transmits() == 1
    [frame] = session.data_to_send()
    assert frame == m.encode_transmit(transmit(0), "tok-1", False)
    assert session.queued_transmits() == 0 and session.data_to_send() == []
