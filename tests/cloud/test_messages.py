"""medagent.cloud.messages: round trips, the spec's example frames, legacy aliases, bad frames."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from medagent.cloud import messages as m

FIXTURES = Path(__file__).parent / "fixtures"

#: One fully populated and one minimal instance of every message type.
SAMPLES: list[m.AgentMessage] = [
    m.ConnectRequest(access_token="tok", agent_id="a1", callback="cb"),
    m.ConnectRequest(access_token="tok", agent_id="a1"),
    m.ConnectResponse(callback="cb", features={"batch": {"maxMessages": 10, "maxBytes": 1024}}),
    m.ConnectResponse(),
    m.HeartbeatRequest(access_token="tok", callback="cb"),
    m.HeartbeatRequest(),
    m.HeartbeatResponse(version="1.2.3", callback="cb"),
    m.HeartbeatResponse(version="1.2.3"),
    m.TransmitRequest(
        remote="10.0.0.1:5000", content_type=m.CONTENT_TYPE_HL7_V2, body="MSH|^~\\&|\rPID|1", channel="adt",
        callback="cb", access_token="tok", return_ack="application", duplicate_of="Agent/a1-x",
    ),
    m.TransmitRequest(remote="r", content_type=m.CONTENT_TYPE_OCTET_STREAM, body="0b1c0d"),
    m.TransmitResponse(remote="r", content_type=m.CONTENT_TYPE_TEXT, body="oops", channel="c", callback="cb", status_code=400),
    m.TransmitResponse(remote="r", content_type=m.CONTENT_TYPE_PING, body=""),
    m.ReloadConfigRequest(callback="cb"),
    m.ReloadConfigRequest(),
    m.ReloadConfigResponse(status_code=200, callback="cb"),
    m.UpgradeRequest(version="4.1.0", force=True, callback="cb"),
    m.UpgradeRequest(),
    m.UpgradeResponse(status_code=200, callback="cb"),
    m.LogsRequest(limit=20, callback="cb"),
    m.LogsRequest(),
    m.LogsResponse(status_code=200, logs=[{"level": "INFO", "msg": "started", "timestamp": "2024-01-01T00:00:00Z"}], callback="cb"),
    m.StatsRequest(callback="cb"),
    m.StatsResponse(status_code=200, stats={"ping": 3, "live": True, "channelStats": {}}, callback="cb"),
    m.ErrorMessage(body="Unknown message type: x", callback="cb"),
    m.ErrorMessage(body="Invalid access token"),
    m.Batch(messages=(m.TransmitRequest(remote="r", content_type="c", body="b", callback="1"),), seq=7),
    m.Batch(messages=(m.TransmitResponse(remote="r", content_type="c", body="b", callback="1"), m.HeartbeatRequest())),
    m.Batch(messages=()),
    m.BatchAck(seq=7),
]


def test_samples_cover_every_message_type() -> None:
    assert {type(s) for s in SAMPLES} == set(m.MESSAGE_TYPES.values())


@pytest.mark.parametrize("receiver", ["agent", "hub"])
@pytest.mark.parametrize("message", SAMPLES, ids=lambda s: type(s).__name__)
def test_every_message_round_trips(message: m.AgentMessage, receiver: m.Receiver) -> None:
    frame = m.encode(message)
    assert isinstance(frame, bytes)
    assert m.decode(frame, receiver) == message
    assert m.decode(frame.decode("utf-8"), receiver) == message  # str and bytes frames alike
    assert m.decode_dict(orjson.loads(frame), receiver) == message


@pytest.mark.parametrize("message", SAMPLES, ids=lambda s: type(s).__name__)
def test_encode_uses_spec_names_and_omits_none(message: m.AgentMessage) -> None:
    data = orjson.loads(m.encode(message))
    assert data["type"] == message.TYPE
    assert None not in data.values()
    snake = {k for k in data if "_" in k} - {"duplicate_of"}  # the extension field is snake_case on the wire
    assert snake == set()


def test_camel_case_names_on_the_wire() -> None:
    data = m.to_dict(SAMPLES[8])
    assert {"accessToken", "contentType", "returnAck"} <= data.keys()
    assert m.to_dict(m.TransmitResponse(remote="r", content_type="c", body="b", status_code=200))["statusCode"] == 200
    assert m.to_dict(SAMPLES[0])["agentId"] == "a1"


# -- the spec's example frames (tests/cloud/fixtures, copied from medplum-protocol.md) ------------

FIXTURE_RECEIVERS: dict[str, tuple[m.Receiver, type[m.AgentMessage]]] = {
    "connect_request.json": ("hub", m.ConnectRequest),
    "connect_response.json": ("agent", m.ConnectResponse),
    "heartbeat_request.json": ("hub", m.HeartbeatRequest),
    "heartbeat_response_agent.json": ("hub", m.HeartbeatResponse),
    "heartbeat_response_server.json": ("agent", m.HeartbeatResponse),
    "transmit_request_inbound.json": ("hub", m.TransmitRequest),
    "transmit_response_inbound.json": ("agent", m.TransmitResponse),
    "transmit_request_outbound.json": ("agent", m.TransmitRequest),
}


def test_every_fixture_is_covered() -> None:
    assert {p.name for p in FIXTURES.glob("*.json")} == set(FIXTURE_RECEIVERS)


@pytest.mark.parametrize("name", sorted(FIXTURE_RECEIVERS))
def test_spec_examples_decode_and_reencode_to_the_same_object(name: str) -> None:
    receiver, cls = FIXTURE_RECEIVERS[name]
    raw = (FIXTURES / name).read_bytes()
    message = m.decode(raw, receiver)
    assert type(message) is cls
    assert orjson.loads(m.encode(message)) == orjson.loads(raw)


def test_spec_example_fields_land_in_the_right_attributes() -> None:
    inbound = m.decode((FIXTURES / "transmit_request_inbound.json").read_bytes(), "hub")
    assert isinstance(inbound, m.TransmitRequest)
    assert inbound.channel == "adt-in" and inbound.remote == "10.1.2.3:50432"
    assert inbound.access_token == "<token>" and inbound.body.split("\r")[1] == "PID|1||123"
    outbound = m.decode((FIXTURES / "transmit_request_outbound.json").read_bytes(), "agent")
    assert isinstance(outbound, m.TransmitRequest) and outbound.return_ack == "first" and outbound.channel is None
    response = m.decode((FIXTURES / "transmit_response_inbound.json").read_bytes(), "agent")
    assert isinstance(response, m.TransmitResponse) and response.status_code == 200
    assert response.callback == inbound.callback


# -- legacy aliases (medplum-protocol.md §2) -----------------------------------------------------


def test_legacy_aliases_depend_on_the_receiver() -> None:
    assert m.decode(b'{"type":"connected"}', "agent") == m.ConnectResponse()
    push = b'{"type":"push","remote":"r","contentType":"c","body":"b","callback":"cb"}'
    assert m.decode(push, "agent") == m.TransmitRequest(remote="r", content_type="c", body="b", callback="cb")
    transmit = b'{"type":"transmit","remote":"r","contentType":"c","body":"b","statusCode":200}'
    assert m.decode(transmit, "agent") == m.TransmitResponse(remote="r", content_type="c", body="b", status_code=200)
    assert m.decode(transmit, "hub") == m.TransmitRequest(remote="r", content_type="c", body="b")
    for legacy_only_to_agent in (b'{"type":"connected"}', push):
        with pytest.raises(m.UnknownMessageType):
            m.decode(legacy_only_to_agent, "hub")


def test_decoded_aliases_reencode_with_the_current_type() -> None:
    assert orjson.loads(m.encode(m.decode(b'{"type":"connected"}', "agent"))) == {"type": "agent:connect:response"}


# -- tolerance and errors ------------------------------------------------------------------------


def test_unknown_fields_are_ignored() -> None:
    frame = b'{"type":"agent:connect:response","callback":"cb","someNewField":{"x":1},"features":{"batch":{}}}'
    assert m.decode(frame, "agent") == m.ConnectResponse(callback="cb", features={"batch": {}})


def test_null_optional_fields_are_treated_as_absent() -> None:
    frame = b'{"type":"agent:transmit:response","remote":"r","contentType":"c","body":"b","channel":null,"statusCode":null}'
    assert m.decode(frame, "agent") == m.TransmitResponse(remote="r", content_type="c", body="b")


def test_unknown_type_carries_the_callback() -> None:
    with pytest.raises(m.UnknownMessageType) as info:
        m.decode(b'{"type":"agent:frob","callback":"Agent/a-1"}', "agent")
    assert str(info.value) == "Unknown message type: agent:frob"
    assert info.value.callback == "Agent/a-1" and info.value.message_type == "agent:frob"
    assert isinstance(info.value, m.ProtocolError)


BAD_FRAMES: list[tuple[bytes | str, str, str | None]] = [
    (b"", "invalid JSON", None),
    (b"not json", "invalid JSON", None),
    (b'{"type":"agent:error","body":"x"', "invalid JSON", None),
    (b"\xff\xfe{}", "invalid JSON", None),  # not UTF-8
    (b"[1,2]", "JSON object", None),
    (b'"agent:error"', "JSON object", None),
    (b"{}", "'type'", None),
    (b'{"type":7,"callback":"cb"}', "'type'", "cb"),
    (b'{"type":"agent:error","body":"x","callback":5}', "'callback'", None),
    (b'{"type":"agent:error","callback":"cb"}', "missing field 'body'", "cb"),
    (b'{"type":"agent:connect:request","agentId":"a"}', "missing field 'accessToken'", None),
    (b'{"type":"agent:transmit:response","remote":"r","contentType":"c","body":3,"callback":"cb"}', "'body'", "cb"),
    (b'{"type":"agent:reloadconfig:response","statusCode":"200"}', "'statusCode'", None),
    (b'{"type":"agent:reloadconfig:response","statusCode":true}', "'statusCode'", None),
    (b'{"type":"agent:upgrade:request","force":"yes"}', "'force'", None),
    (b'{"type":"agent:logs:response","statusCode":200,"logs":{}}', "'logs'", None),
    (b'{"type":"agent:stats:response","statusCode":200,"stats":[]}', "'stats'", None),
    (b'{"type":"agent:connect:response","features":[]}', "'features'", None),
    (b'{"type":"agent:batch:ack","seq":"1"}', "'seq'", None),
    (b'{"type":"agent:batch","messages":{}}', "must be a list", None),
    (b'{"type":"agent:batch","messages":[{"type":"agent:batch","messages":[]}]}', "nested", None),
    (b'{"type":"agent:batch","messages":[{"type":"agent:error"}]}', "missing field 'body'", None),
    (b'{"type":"agent:batch","messages":[7]}', "JSON object", None),
]


@pytest.mark.parametrize(("frame", "why", "callback"), BAD_FRAMES)
def test_bad_frames_raise_protocol_error(frame: bytes, why: str, callback: str | None) -> None:
    with pytest.raises(m.ProtocolError, match=re.escape(why)) as info:
        m.decode(frame, "agent")
    assert info.value.callback == callback


def test_unknown_type_inside_a_batch_is_reported() -> None:
    with pytest.raises(m.UnknownMessageType, match="agent:frob"):
        m.decode(b'{"type":"agent:batch","messages":[{"type":"agent:frob"}]}', "hub")


def test_new_callback_has_medplum_format() -> None:
    callback = m.new_callback("3f2c")
    assert re.fullmatch(r"Agent/3f2c-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", callback)
    assert callback != m.new_callback("3f2c")


# -- property: random content round-trips ---------------------------------------------------------

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)  # JSON cannot carry lone surrogates
OPTIONAL_TEXT = st.none() | TEXT


@given(
    remote=TEXT, content_type=TEXT, body=TEXT, channel=OPTIONAL_TEXT, callback=OPTIONAL_TEXT,
    access_token=OPTIONAL_TEXT, return_ack=OPTIONAL_TEXT,
)
def test_transmit_request_round_trips_any_text(**fields: Any) -> None:
    message = m.TransmitRequest(**fields)
    assert m.decode(m.encode(message), "hub") == message


@given(status=st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1), body=TEXT)
def test_transmit_response_round_trips_any_status(status: int | None, body: str) -> None:
    message = m.TransmitResponse(remote="r", content_type="c", body=body, status_code=status)
    assert m.decode(m.encode(message), "agent") == message
