"""The pure agent protocol core (medagent/proto/agent_session.py), both ends, transition by transition.

No sockets, no loop, no clock: frames and times go in, events and frames come out. The
property tests wiring both ends together are in test_agent_session_property.py.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medagent.cloud import messages as m
from medagent.proto import agent_session as core
from medagent.proto.agent_session import (
    AgentSession,
    BatchSettings,
    EndKind,
    HubSession,
    SessionEnd,
    SessionState,
)

AGENT = "agent-1"
FEATURES = {"batch": {"maxMessages": 1000, "maxBytes": 4 * 1024 * 1024}}


def frames(session: AgentSession | HubSession) -> list[dict[str, Any]]:
    return [orjson.loads(f) for f in session.data_to_send()]


def wire(message: m.AgentMessage | dict[str, Any]) -> bytes:
    return orjson.dumps(message) if isinstance(message, dict) else m.encode(message)


def transmit(n: int, **extra: Any) -> m.TransmitRequest:
    return m.TransmitRequest(remote="10.0.0.1:5000", content_type=m.CONTENT_TYPE_HL7_V2,
                             body=f"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|MSG{n}|P|2.5.1",
                             channel="adt-in", callback=f"Agent/{AGENT}-{n}", access_token="placeholder",
                             **extra)


def agent(now: float = 0.0, features: dict[str, Any] | None = None, **kwargs: Any) -> AgentSession:
    """A live agent session (connect request already taken out)."""
    session = AgentSession(version="9.9.9", now=now, heartbeat_s=10.0, **kwargs)
    session.connect("tok-1", AGENT)
    session.data_to_send()
    response = m.ConnectResponse(features=features) if features is not None else m.ConnectResponse()
    assert session.receive_frame(m.encode(response)) == [core.Live(features or {})]
    return session


def hub(now: float = 0.0) -> HubSession:
    """A live hub session."""
    session = HubSession(version="1.0-hub", now=now, heartbeat_s=10.0)
    [requested] = session.receive_frame(wire(m.ConnectRequest(access_token="tok", agent_id=AGENT)))
    assert requested == core.ConnectRequested("tok", AGENT, None)
    session.accept(AGENT, FEATURES, None)
    session.data_to_send()
    return session


# -- agent: connect ---------------------------------------------------------------------------


def test_connect_request_is_the_first_frame_and_live_needs_the_response() -> None:
    session = AgentSession(version="9.9.9", now=0.0)
    session.connect("tok-1", AGENT)
    assert frames(session) == [{"type": "agent:connect:request", "accessToken": "tok-1", "agentId": AGENT}]
    assert session.state is SessionState.AWAITING_CONNECT and not session.send_transmit(transmit(1))
    assert session.receive_frame(b'{"type":"connected"}') == [core.Live({})]  # Medplum's legacy alias
    assert session.live and session.batch_limits is None
    assert session.receive_frame(b'{"type":"agent:connect:response"}') == []  # reported once
    assert session.send_transmit(transmit(1))


def test_callback_less_error_before_live_is_a_refusal() -> None:
    session = AgentSession(version="9.9.9", now=0.0)
    session.connect("tok-1", AGENT)
    events = session.receive_frame(wire(m.ErrorMessage("Missing agent ID")))
    assert events == [SessionEnd(EndKind.REFUSED, "hub refused the connection: Missing agent ID")]
    assert session.closed and session.data_to_send() == []
    assert session.receive_frame(b'{"type":"agent:connect:response"}') == []  # nothing after the end


@pytest.mark.parametrize("live", [False, True])
def test_invalid_token_ends_the_session_for_renewal(live: bool) -> None:
    session = agent() if live else AgentSession(version="v", now=0.0)
    if live:
        assert session.send_transmit(transmit(1))
        session.data_to_send()
    events = session.receive_frame(wire(m.ErrorMessage("Invalid access token", "Agent/agent-1-1" if live else None)))
    assert [type(e) for e in events] == [SessionEnd] and events[0].kind is EndKind.TOKEN_REJECTED  # type: ignore
    assert not events[0].abort  # type: ignore[union-attr]
    assert session.closed and not session.send_transmit(transmit(2))


def test_features_decide_the_mode_and_the_smaller_limits_win() -> None:
    assert agent(features={}).batch_limits is None
    assert agent(features={"batch": True}).batch_limits is None  # not a mapping: not advertised
    assert agent(features=FEATURES, batching=BatchSettings(enabled=False)).batch_limits is None
    assert agent(features={"batch": {}}).batch_limits == (1000, 4 * 1024 * 1024)
    limited = agent(features={"batch": {"maxMessages": 3, "maxBytes": True}},
                    batching=BatchSettings(max_messages=10, max_bytes=2048))
    assert limited.batch_limits == (3, 2048)


@pytest.mark.parametrize("bad", [{"heartbeat_s": 0}, {"max_missed_heartbeats": 0},
                                 {"batching": BatchSettings(max_messages=0)},
                                 {"batching": BatchSettings(max_bytes=100)}])
def test_impossible_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AgentSession(version="v", now=0.0, **bad)


# -- agent: sending ---------------------------------------------------------------------------


def test_plain_mode_one_frame_per_transmit_with_the_current_token_and_no_extensions() -> None:
    session = agent()
    assert session.send_transmit(transmit(1, duplicate_of="Agent/agent-1-0", no_reply=True))
    assert session.send_transmit(transmit(2))
    session.send(m.HeartbeatResponse(version="x"))  # answers/control frames go first
    session.access_token = "tok-2"
    sent = frames(session)
    assert [f["type"] for f in sent] == ["agent:heartbeat:response"] + ["agent:transmit:request"] * 2
    assert all(f["accessToken"] == "tok-2" and "duplicateOf" not in f and "noReply" not in f for f in sent[1:])
    assert session.unconfirmed_count() == 2 and session.transmits_sent == 2 and session.frames_sent == 4  # + connect
    with pytest.raises(ValueError, match="callback"):
        session.send_transmit(m.TransmitRequest(remote="r", content_type="c", body="b"))


def test_plain_mode_confirmations_by_response_or_error() -> None:
    session = agent()
    for n in (1, 2, 3):
        session.send_transmit(transmit(n))
    session.data_to_send()
    response = m.TransmitResponse(remote="r", content_type="c", body="MSA|AA", callback="Agent/agent-1-2")
    assert session.receive_frame(m.encode(response)) == [core.Confirmed(["Agent/agent-1-2"]),
                                                         core.TransmitAnswered(response)]
    events = session.receive_frame(wire(m.ErrorMessage("Bot not found", "Agent/agent-1-1")))
    assert events == [core.TransmitFailed("Agent/agent-1-1", "Bot not found"), core.Confirmed(["Agent/agent-1-1"])]
    # a second answer for a confirmed callback confirms nothing again
    assert session.receive_frame(m.encode(response)) == [core.TransmitAnswered(response)]
    assert session.unconfirmed_count() == 1 and session.confirmed == 2


def test_batch_mode_packs_frames_numbers_them_and_acks_cumulatively() -> None:
    session = agent(features={"batch": {"maxMessages": 2}})
    for n in range(1, 6):
        session.send_transmit(transmit(n, duplicate_of="Agent/agent-1-0" if n == 1 else None, no_reply=True))
    sent = frames(session)
    assert [(f["type"], f["seq"], len(f["messages"])) for f in sent] == [
        ("agent:batch", 1, 2), ("agent:batch", 2, 2), ("agent:batch", 3, 1)]
    first = sent[0]["messages"][0]
    assert first["duplicateOf"] == "Agent/agent-1-0" and first["noReply"] is True and first["accessToken"] == "tok-1"
    # a transmit response in batch mode is an answer, not a confirmation
    response = m.TransmitResponse(remote="r", content_type="c", body="x", callback="Agent/agent-1-1")
    assert session.receive_frame(m.encode(response)) == [core.TransmitAnswered(response)]
    assert session.receive_frame(b'{"type":"agent:batch:ack","seq":2}') == [
        core.Confirmed([f"Agent/agent-1-{n}" for n in (1, 2, 3, 4)])]
    assert session.receive_frame(b'{"type":"agent:batch:ack","seq":1}') == []  # stale
    assert session.receive_frame(b'{"type":"agent:batch:ack","seq":9}') == [core.Confirmed(["Agent/agent-1-5"])]
    assert session.unconfirmed_count() == 0 and session.batches_sent == 3
    session.send_transmit(transmit(6))
    assert frames(session)[0]["seq"] == 4  # numbering continues on the same connection


def test_batch_mode_an_error_settles_its_send_and_a_later_ack_does_not_confirm_it() -> None:
    """After a transient store failure the agent resends the row under a later seq; the ack of a
    batch after the failed one is cumulative, but must confirm only the resend's batch, once."""
    session = agent(features={"batch": {}})
    session.send_transmit(transmit(1))
    assert frames(session)[0]["seq"] == 1
    failure = session.receive_frame(wire(m.ErrorMessage("The hub could not store the message (X); resend it",
                                                        "Agent/agent-1-1")))
    assert failure == [core.TransmitFailed("Agent/agent-1-1", "The hub could not store the message (X); resend it")]
    session.send_transmit(transmit(1))  # the resend
    assert frames(session)[0]["seq"] == 2
    session.send_transmit(transmit(2))  # a later row
    assert frames(session)[0]["seq"] == 3
    assert session.unconfirmed_count() == 2
    assert session.receive_frame(b'{"type":"agent:batch:ack","seq":1}') == []  # the failed send: settled
    assert session.receive_frame(b'{"type":"agent:batch:ack","seq":3}') == [
        core.Confirmed(["Agent/agent-1-1", "Agent/agent-1-2"])]
    assert session.unconfirmed_count() == 0


def test_batch_frames_are_cut_near_the_target_size() -> None:
    session = agent(features=FEATURES)
    big = "x" * 20_000
    for n in range(12):
        session.send_transmit(m.TransmitRequest(remote="r", content_type="c", body=big, callback=f"cb-{n}"))
    sent = session.data_to_send()
    assert len(sent) > 1 and all(len(f) <= core.BATCH_FRAME_TARGET_BYTES + 64 for f in sent)
    assert sum(len(orjson.loads(f)["messages"]) for f in sent) == 12


def test_unencodable_text_is_replaced_not_fatal() -> None:
    session = agent()
    session.send_transmit(m.TransmitRequest(remote="r", content_type="c", body="MSH|\udcff", callback="cb-1"))
    assert frames(session)[0]["body"] == "MSH|\ufffd"


# -- agent: receiving -------------------------------------------------------------------------


def test_requests_replies_and_heartbeats() -> None:
    session = agent()
    reload = m.ReloadConfigRequest(callback="Agent/agent-1-r")
    assert session.receive_frame(m.encode(reload)) == [core.Request(reload)]
    push = {"type": "push", "remote": "mllp://h:1", "contentType": "c", "body": "b", "callback": "cb-p"}
    [request] = session.receive_frame(wire(push))
    assert isinstance(request, core.Request) and isinstance(request.message, m.TransmitRequest)

    session.expect_reply("cb-q")
    with pytest.raises(ValueError):
        session.expect_reply("cb-q")
    reply = m.ErrorMessage("nope", "cb-q")
    assert session.receive_frame(m.encode(reply)) == [core.Reply(reply)]
    assert session.receive_frame(m.encode(reply)) == [core.TransmitFailed("cb-q", "nope")]  # only once

    session.expect_reply("cb-r")  # a hub *request* with a waited-for callback is still a request
    outbound = m.TransmitRequest(remote="r", content_type="c", body="b", callback="cb-r")
    assert session.receive_frame(m.encode(outbound)) == [core.Request(outbound)]
    session.forget("cb-r")

    assert session.receive_frame(b'{"type":"agent:heartbeat:request","callback":"hb"}') == []
    assert frames(session) == [{"type": "agent:heartbeat:response", "version": "9.9.9", "callback": "hb"}]
    assert session.receive_frame(b'{"type":"agent:heartbeat:response","version":"4.0"}') == [
        core.HeartbeatAnswered("4.0", None)]
    assert session.receive_frame(wire(m.ErrorMessage("Something odd"))) == [core.PeerError("Something odd", None)]
    assert session.data_to_send() == []  # a hub error is never answered


def test_a_batch_from_the_hub_is_unpacked_in_order() -> None:
    session = agent(features=FEATURES)
    for n in (1, 2):
        session.send_transmit(transmit(n))
    session.data_to_send()
    responses = [m.TransmitResponse(remote="r", content_type="c", body="x", callback=f"Agent/agent-1-{n}")
                 for n in (1, 2)]
    batch = m.Batch((responses[0], m.BatchAck(1), responses[1]))
    assert session.receive_frame(m.encode(batch)) == [
        core.TransmitAnswered(responses[0]), core.Confirmed(["Agent/agent-1-1", "Agent/agent-1-2"]),
        core.TransmitAnswered(responses[1])]
    assert session.messages_received == 1 + 3  # the connect response, then the batch's three


MALFORMED_AT_AGENT: list[tuple[bytes, str, str | None]] = [
    (b"this is not json", "WebSocket error on incoming message: invalid JSON", None),
    (b"\xff\xfe", "WebSocket error on incoming message: invalid JSON", None),
    (b"[1, 2, 3]", "WebSocket error on incoming message: a message must be a JSON object", None),
    (b'{"type": 7}', "WebSocket error on incoming message: missing or non-string field 'type'", None),
    (b'{"type":"agent:transmit:response","remote":"r","callback":"cb-1"}',
     "WebSocket error on incoming message: agent:transmit:response: missing field 'contentType'", "cb-1"),
    (b'{"type":"agent:batch:ack","seq":"1"}', "WebSocket error on incoming message: agent:batch:ack: field 'seq'", None),
    (b'{"type":"agent:batch","messages":[{"type":"agent:batch","messages":[]}],"seq":1}',
     "WebSocket error on incoming message: agent:batch: batches may not be nested", None),
    (b'{"type":"agent:frobnicate","callback":"cb-2"}', "Unknown message type: agent:frobnicate", "cb-2"),
    (b'{"type":"agent:connect:request","accessToken":"x","agentId":"y","callback":"cb-3"}',
     "Unknown message type: agent:connect:request", "cb-3"),  # agent -> hub only
]


@pytest.mark.parametrize(("frame", "body", "callback"), MALFORMED_AT_AGENT)
def test_malformed_frames_get_agent_error_at_the_agent(frame: bytes, body: str, callback: str | None) -> None:
    session = agent()
    events = session.receive_frame(frame)
    assert [type(e) for e in events] == [core.Violation]
    [error] = frames(session)
    assert error["type"] == "agent:error" and error["body"].startswith(body)
    assert error.get("callback") == callback
    assert session.live  # a bad frame never ends the session


# -- heartbeats and deadlines -----------------------------------------------------------------


def test_heartbeat_ticks_and_dead_link_detection() -> None:
    session = agent(now=100.0, max_missed_heartbeats=2)
    assert session.next_deadline() == 110.0
    assert session.tick(105.0) == [] and session.data_to_send() == []  # not due yet
    assert session.tick(110.0) == []
    assert frames(session) == [{"type": "agent:heartbeat:request"}]
    assert session.next_deadline() == 120.0 and session.outstanding_heartbeats == 1
    assert session.receive_frame(b'{"type":"agent:heartbeat:response","version":"4"}') == [
        core.HeartbeatAnswered("4", 110.0)]
    assert session.outstanding_heartbeats == 0
    session.tick(120.0)
    session.receive_frame(b'{"type":"agent:batch:ack","seq":0}')  # any frame proves life
    session.tick(130.0)
    session.tick(140.0)
    assert session.outstanding_heartbeats == 2 and len(session.data_to_send()) == 3
    [end] = session.tick(150.0)
    assert isinstance(end, SessionEnd) and end.kind is EndKind.DEAD and end.abort and "dead link" in end.reason
    assert session.closed and session.tick(1000.0) == []


def test_a_late_tick_does_not_burst() -> None:
    session = agent(now=0.0)
    session.tick(95.0)  # the loop was stalled for many periods
    assert session.next_deadline() == 105.0 and session.outstanding_heartbeats == 1


def test_a_socket_that_never_goes_live_is_replaced_after_two_ticks() -> None:
    session = AgentSession(version="v", now=0.0, heartbeat_s=1.0)
    session.connect("tok", AGENT)
    session.data_to_send()
    assert session.tick(1.0) == [] and session.data_to_send() == []  # no heartbeats before live
    [end] = session.tick(2.0)
    assert isinstance(end, SessionEnd) and end.kind is EndKind.NOT_LIVE and not end.abort


# -- hub end ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("frame", "error"), [
    ({"type": "agent:connect:request", "agentId": AGENT}, core.MISSING_ACCESS_TOKEN),
    ({"type": "agent:connect:request", "accessToken": 5, "agentId": AGENT}, core.MISSING_ACCESS_TOKEN),
    ({"type": "agent:connect:request", "accessToken": "tok"}, core.MISSING_AGENT_ID),
    ({"type": "agent:connect:request", "accessToken": "tok", "agentId": ""}, core.MISSING_AGENT_ID),
])
def test_hub_connect_errors_follow_medplum_and_keep_the_session(frame: dict[str, Any], error: str) -> None:
    session = HubSession(version="h", now=0.0)
    assert session.receive_frame(wire(frame)) == []
    assert frames(session) == [{"type": "agent:error", "body": error}]
    assert session.state is SessionState.AWAITING_CONNECT


def test_hub_accepts_refuses_and_never_changes_agents() -> None:
    session = HubSession(version="h", now=0.0)
    assert session.receive_frame(b'{"type":"agent:heartbeat:request","callback":"hb"}') == [
        core.Violation("agent:heartbeat:request before agent:connect:request", 50)]
    assert frames(session) == [{"type": "agent:error", "body": core.NOT_CONNECTED, "callback": "hb"}]
    connect = wire({"type": "agent:connect:request", "accessToken": "t", "agentId": AGENT, "callback": "c1"})
    assert session.receive_frame(connect) == [core.ConnectRequested("t", AGENT, "c1")]
    session.refuse(core.INVALID_ACCESS_TOKEN)
    assert frames(session) == [{"type": "agent:error", "body": core.INVALID_ACCESS_TOKEN}]
    session.receive_frame(connect)
    session.accept(AGENT, FEATURES, "c1")
    assert frames(session) == [{"type": "agent:connect:response", "callback": "c1", "features": FEATURES}]
    assert session.live and session.agent_id == AGENT
    other = wire({"type": "agent:connect:request", "accessToken": "t", "agentId": "agent-2"})
    assert session.receive_frame(other) == []
    assert frames(session) == [{"type": "agent:error", "body": core.INVALID_ACCESS_TOKEN}]


def test_hub_batches_must_climb_and_acks_never_run_ahead() -> None:
    session = hub()
    requests = (transmit(1), transmit(2))
    [received] = session.receive_frame(m.encode(m.Batch(requests, seq=1)))
    assert received == core.TransmitsReceived(requests, 1) and session.batching
    session.acknowledge(5)  # clamped to what arrived
    assert frames(session) == [{"type": "agent:batch:ack", "seq": 1}]
    session.acknowledge(1)
    assert session.data_to_send() == []  # never twice
    [violation] = session.receive_frame(m.encode(m.Batch((transmit(3),), seq=1)))
    assert isinstance(violation, core.Violation)
    assert frames(session)[0]["body"] == "agent:batch seq 1 is not above 1"
    hb = m.HeartbeatRequest(callback="hb")
    events = session.receive_frame(m.encode(m.Batch((transmit(4), hb), seq=2)))
    assert events == [core.TransmitsReceived((transmit(4),), 2)]
    assert frames(session) == [{"type": "agent:heartbeat:response", "version": "1.0-hub", "callback": "hb"}]


def test_hub_routes_replies_and_refuses_hub_bound_types() -> None:
    session = hub()
    for reply in (m.TransmitResponse(remote="r", content_type="c", body="b", callback="cb1"),
                  m.ReloadConfigResponse(status_code=200, callback="cb2"), m.UpgradeResponse(200, "cb3"),
                  m.LogsResponse(200, [], "cb4"), m.StatsResponse(200, {}, "cb5"), m.ErrorMessage("x", "cb6")):
        assert session.receive_frame(m.encode(reply)) == [core.Reply(reply)]
    assert session.receive_frame(b'{"type":"transmit","remote":"r","contentType":"c","body":"b"}') == [
        core.TransmitsReceived((m.TransmitRequest(remote="r", content_type="c", body="b"),), None)]
    assert session.receive_frame(b'{"type":"agent:heartbeat:response","version":"9"}') == [
        core.HeartbeatAnswered("9", None)]
    assert session.receive_frame(b'{"type":"agent:batch:ack","seq":3}') == []
    [violation] = session.receive_frame(b'{"type":"agent:reloadconfig:request","callback":"cb7"}')
    assert isinstance(violation, core.Violation)
    assert frames(session) == [{"type": "agent:error", "callback": "cb7",
                                "body": "Unexpected message type for the hub: agent:reloadconfig:request"}]


@pytest.mark.parametrize(("frame", "body"), [
    (b"{not json", "Invalid message: not JSON ("),
    (b"[1, 2]", "Invalid message: a message must be a JSON object"),
    (b'{"type":"agent:frob","callback":"c"}', "Unknown message type: agent:frob"),
])
def test_hub_malformed_frames(frame: bytes, body: str) -> None:
    session = hub()
    [violation] = session.receive_frame(frame)
    assert isinstance(violation, core.Violation)
    assert frames(session)[0]["body"].startswith(body)


def test_hub_heartbeats_while_live_and_optional_dead_link() -> None:
    session = HubSession(version="h", now=0.0, heartbeat_s=1.0, max_missed_heartbeats=1)
    assert session.tick(1.0) == [] and session.data_to_send() == []  # not live: silent
    session.receive_frame(wire(m.ConnectRequest(access_token="t", agent_id=AGENT)))
    session.accept(AGENT, {}, None)
    session.data_to_send()
    assert session.tick(2.0) == [] and frames(session) == [{"type": "agent:heartbeat:request"}]
    [end] = session.tick(3.0)
    assert isinstance(end, SessionEnd) and end.kind is EndKind.DEAD and session.closed
    session.acknowledge(1)
    session.send(m.HeartbeatRequest())
    assert session.data_to_send() == []  # a closed session queues nothing


# -- never raises on received bytes -----------------------------------------------------------


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
TYPES = st.sampled_from(sorted(m.MESSAGE_TYPES) + ["connected", "push", "transmit", "agent:x"])


@st.composite
def frames_of_any_shape(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind == 1:
        return orjson.dumps(draw(JSON_VALUES))
    fields = draw(st.dictionaries(st.sampled_from(["callback", "body", "seq", "messages", "remote", "contentType",
                                                   "statusCode", "version", "features", "accessToken", "agentId"]),
                                  JSON_VALUES, max_size=6))
    return orjson.dumps({"type": draw(TYPES), **fields})


@settings(max_examples=300, deadline=None)
@given(st.lists(frames_of_any_shape(), max_size=8), st.booleans())
def test_any_bytes_get_an_answer_or_an_event_never_an_exception(junk: list[bytes], batching: bool) -> None:
    for session in (agent(features=FEATURES if batching else {}), hub()):
        for frame in junk:
            events = session.receive_frame(frame)
            out = session.data_to_send()
            for data in out:
                decoded = orjson.loads(data)  # whatever it sends is JSON
                assert isinstance(decoded, dict) and isinstance(decoded["type"], str)
            bad = [e for e in events if isinstance(e, core.Violation)]
            if bad:  # a bad frame was answered with agent:error
                assert any(orjson.loads(d)["type"] == "agent:error" for d in out)
