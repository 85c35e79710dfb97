"""medagent.cloud.link and .auth against a stand-in that behaves like a plain Medplum server.

Real websockets and HTTP on 127.0.0.1 (port 0); every wait is bounded by `eventually()`; every
server and link a test starts is stopped by its fixture or context manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from medplum_standin import MedplumStandIn

from medagent.cloud import messages as m
from medagent.cloud.auth import AuthError, HubUnavailableError, TokenClient
from medagent.cloud.link import (
    AgentLink,
    Backoff,
    LinkConfigError,
    LinkSettings,
    LinkState,
    websocket_url,
)

AGENT_VERSION = "9.9.9-test"
ADT = "MSH|^~\\&|ADT1|HOSP|MEDPLUM|CLOUD|20240101120000||ADT^A01^ADT_A01|MSG{n:05d}|P|2.5.1\rPID|1||123"


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Wait (bounded) until ``predicate()`` is true."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class RecordingHandler:
    """A LinkHandler that records every event and answers hub requests like a tiny runtime."""

    def __init__(self) -> None:
        self.lives: list[Mapping[str, Any]] = []
        self.downs: list[str] = []
        self.confirmed: list[str] = []
        self.responses: list[m.TransmitResponse] = []
        self.requests: list[m.AgentMessage] = []
        self.errors: list[tuple[str, str]] = []

    def on_live(self, features: Mapping[str, Any]) -> None:
        self.lives.append(features)

    def on_down(self, reason: str) -> None:
        self.downs.append(reason)

    def on_confirmed(self, callbacks: Sequence[str]) -> None:
        self.confirmed.extend(callbacks)

    def on_transmit_response(self, message: m.TransmitResponse) -> None:
        self.responses.append(message)

    def on_transmit_error(self, callback: str, reason: str) -> None:
        self.errors.append((callback, reason))

    async def on_request(self, message: m.AgentMessage) -> m.AgentMessage | None:
        self.requests.append(message)
        if isinstance(message, m.TransmitRequest):
            return m.TransmitResponse(
                remote=message.remote, content_type=m.CONTENT_TYPE_HL7_V2, body="MSA|AA|OUT1", status_code=200
            )
        if isinstance(message, m.StatsRequest):
            return m.StatsResponse(status_code=200, stats={"live": True})
        if isinstance(message, m.ReloadConfigRequest):
            raise RuntimeError("reload failed: Endpoint/1 has no address")
        return None


def settings_for(hub: MedplumStandIn, **overrides: Any) -> LinkSettings:
    values: dict[str, Any] = dict(
        base_url=hub.base_url,
        client_id=hub.client_id,
        client_secret=hub.client_secret,
        agent_id=hub.agent_id,
        heartbeat_s=0.1,
        reconnect_min_s=0.02,
        reconnect_max_s=0.2,
        request_timeout_s=2.0,
    )
    values.update(overrides)
    return LinkSettings(**values)


@contextlib.asynccontextmanager
async def running_link(hub: MedplumStandIn, handler: RecordingHandler | None = None, **overrides: Any) -> AsyncIterator[AgentLink]:
    link = AgentLink(settings_for(hub, **overrides), handler or RecordingHandler(), version=AGENT_VERSION)
    await link.start()
    try:
        yield link
    finally:
        await link.close()


PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "ws_proxy", "wss_proxy", "socks_proxy")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The link honours HTTPS_PROXY & co.; these tests talk to 127.0.0.1 directly."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
async def hub() -> AsyncIterator[MedplumStandIn]:
    standin = MedplumStandIn()
    await standin.start()
    try:
        yield standin
    finally:
        await standin.stop()
    assert standin.violations == []


def transmit(n: int, agent_id: str = "agent-1") -> m.TransmitRequest:
    return m.TransmitRequest(
        remote="10.1.2.3:50432",
        content_type=m.CONTENT_TYPE_HL7_V2,
        body=ADT.format(n=n),
        channel="adt-in",
        callback=m.new_callback(agent_id),
        access_token="placeholder",
    )


# -- pure helpers -------------------------------------------------------------------------------


def test_websocket_url_follows_medplum() -> None:
    assert websocket_url("https://api.medplum.com/") == "wss://api.medplum.com/ws/agent"
    assert websocket_url("http://127.0.0.1:8103/fhir/R4?x=1") == "ws://127.0.0.1:8103/ws/agent"
    assert websocket_url("https://user:pw@hub.example.org:8443") == "wss://hub.example.org:8443/ws/agent"
    with pytest.raises(LinkConfigError, match="must be http"):
        websocket_url("ftp://hub.example.org/")


def test_backoff_grows_with_jitter_caps_and_resets() -> None:
    low = Backoff(0.1, 1.0, rng=lambda: 0.0)
    assert [round(low.next_delay(), 3) for _ in range(6)] == [0.1, 0.1, 0.2, 0.4, 0.5, 0.5]
    high = Backoff(0.1, 1.0, rng=lambda: 1.0)
    assert [round(high.next_delay(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    high.reset()
    assert high.next_delay() == pytest.approx(0.1)
    with pytest.raises(LinkConfigError):
        Backoff(0.0, 1.0)


def test_transmit_encoding_fills_the_token_and_strips_extensions() -> None:
    message = m.TransmitRequest(
        remote="r", content_type="c", body="b\u00e9\r", channel="ch", callback="cb", return_ack="first",
        duplicate_of="Agent/x-1", no_reply=True,
    )
    expected = {**m.to_dict(message), "accessToken": "tok"}
    assert orjson.loads(m.encode_transmit(message, "tok", extensions=True)) == expected
    plain = orjson.loads(m.encode_transmit(message, "tok", extensions=False))
    assert plain == {k: v for k, v in expected.items() if k not in ("duplicateOf", "noReply")}
    assert m.decode(orjson.dumps(plain), "hub") == m.TransmitRequest(
        remote="r", content_type="c", body="b\u00e9\r", channel="ch", callback="cb", return_ack="first", access_token="tok"
    )


# -- auth ---------------------------------------------------------------------------------------


async def test_token_client_fetches_caches_and_reads_rest(hub: MedplumStandIn) -> None:
    client = TokenClient(hub.base_url, hub.client_id, hub.client_secret)
    try:
        token = await client.get_token()
        assert token == "standin-token-1"
        assert await client.get_token() == token  # cached
        assert hub.token_requests == [
            {"grant_type": "client_credentials", "client_id": hub.client_id, "client_secret": hub.client_secret}
        ]
        agent = await client.fetch_json("/fhir/R4/Agent/agent-1")
        assert agent["resourceType"] == "Agent" and agent["id"] == "agent-1"
        hub.revoke_tokens()  # 401 -> one new token, then success
        assert (await client.fetch_json("fhir/R4/Agent/agent-1"))["id"] == "agent-1"
        assert client.tokens_fetched == 2
    finally:
        await client.close()


async def test_token_client_bad_credentials_is_an_auth_error(hub: MedplumStandIn) -> None:
    client = TokenClient(hub.base_url, hub.client_id, "wrong-secret")
    try:
        with pytest.raises(AuthError, match="check client_id and client_secret"):
            await client.get_token()
    finally:
        await client.close()


async def test_token_client_unreachable_hub_is_transient() -> None:
    standin = MedplumStandIn()
    await standin.start()
    url = standin.base_url
    await standin.stop()  # nothing listens there now
    client = TokenClient(url, "c", "s", timeout_s=2.0)
    try:
        with pytest.raises(HubUnavailableError):
            await client.get_token()
    finally:
        await client.close()


# -- link: connect, heartbeats, transmit ---------------------------------------------------------


async def test_connects_with_token_and_goes_live(hub: MedplumStandIn) -> None:
    handler = RecordingHandler()
    assert AgentLink(settings_for(hub), handler).send_transmit(transmit(1)) is False  # not started
    async with running_link(hub, handler) as link:
        await eventually(lambda: link.live, what="live")
        assert handler.lives == [{}] and dict(link.features) == {}
        assert link.state is LinkState.LIVE
        connect = hub.frames_of("agent:connect:request")
        assert connect == [{"type": "agent:connect:request", "accessToken": "standin-token-1", "agentId": "agent-1"}]
        assert (await link.fetch_json("/fhir/R4/Agent/agent-1"))["status"] == "active"
        assert link.stats()["live"] is True and link.stats()["batching"] is False
    assert handler.downs == ["link closed by the agent"]
    assert link.state is LinkState.STOPPED


async def test_transmits_are_written_at_the_end_of_the_turn_or_at_once_by_flush(hub: MedplumStandIn) -> None:
    """No task wakes per frame: what send_transmit queued in a loop turn is written as one write
    at the end of that turn, or at once by flush() (a dispatcher ending its batch)."""
    handler = RecordingHandler()
    async with running_link(hub, handler) as link:
        await eventually(lambda: link.live, what="live")
        before = link.stats()
        assert link.send_transmit(transmit(1)) and link.send_transmit(transmit(2))
        assert link.stats()["messages_sent"] == before["messages_sent"]  # queued, not written yet
        link.flush()
        after = link.stats()
        assert after["messages_sent"] == before["messages_sent"] + 2
        assert after["frames_sent"] == before["frames_sent"] + 2
        assert link.send_transmit(transmit(3))
        await asyncio.sleep(0)  # the scheduled write runs before this task resumes
        assert link.stats()["messages_sent"] == before["messages_sent"] + 3
        await eventually(lambda: len(handler.confirmed) == 3, what="the three confirmations")


async def test_heartbeats_both_ways(hub: MedplumStandIn) -> None:
    async with running_link(hub) as link:
        await eventually(lambda: link.live, what="live")
        await eventually(lambda: len(hub.frames_of("agent:heartbeat:request")) >= 2, what="agent heartbeats")
        assert hub.frames_of("agent:heartbeat:request")[0] == {"type": "agent:heartbeat:request"}
        await eventually(lambda: link.stats()["last_ping_ms"] is not None, what="ping stat")
        reply = await hub.request({"type": "agent:heartbeat:request"})
        assert reply["type"] == "agent:heartbeat:response" and reply["version"] == AGENT_VERSION


async def test_transmit_round_trip_and_plain_mode_confirmations(hub: MedplumStandIn) -> None:
    handler = RecordingHandler()
    async with running_link(hub, handler) as link:
        await eventually(lambda: link.live, what="live")
        sent = [transmit(n) for n in range(50)]
        assert all(link.send_transmit(message) for message in sent)  # one loop iteration
        await eventually(lambda: len(handler.confirmed) == 50, what="confirmations")
        await eventually(lambda: len(handler.responses) == 50, what="bot replies")
        assert sorted(handler.confirmed) == sorted(message.callback for message in sent)
        assert {r.callback for r in handler.responses} == {message.callback for message in sent}
        assert "MSA|AA|MSG00007" in next(r.body for r in handler.responses if r.callback == sent[7].callback)
        frames = hub.frames_of("agent:transmit:request")
        assert len(frames) == 50  # one frame each, never agent:batch (the fixture checks violations)
        assert all(f["accessToken"] == "standin-token-1" for f in frames)  # placeholder overwritten
        assert frames[0] == {**m.to_dict(sent[0]), "accessToken": "standin-token-1"}
        assert link.stats()["unconfirmed"] == 0 and link.stats()["messages_sent"] == 50


async def test_agent_error_confirms_a_transmit_in_plain_mode(hub: MedplumStandIn) -> None:
    hub.transmit_reply = "error"
    handler = RecordingHandler()
    async with running_link(hub, handler) as link:
        await eventually(lambda: link.live, what="live")
        message = transmit(1)
        assert link.send_transmit(message)
        await eventually(lambda: handler.confirmed == [message.callback], what="confirmation")
        assert handler.responses == []
        assert handler.errors == [(message.callback, "Bot not found")]


async def test_token_rejected_for_a_transmit_reconnects_instead_of_confirming(hub: MedplumStandIn) -> None:
    handler = RecordingHandler()
    async with running_link(hub, handler) as link:
        await eventually(lambda: link.live, what="live")
        hub.revoke_tokens()  # the hub answers the next transmit with "Invalid access token"
        message = transmit(1)
        assert link.send_transmit(message)
        await eventually(lambda: len(handler.lives) == 2 and link.live, what="reconnect with a new token")
        assert handler.downs == ["the hub rejected the access token"]
        assert handler.confirmed == [] and handler.errors == []  # on_down: the runtime re-sends it
        assert link.send_transmit(message)
        await eventually(lambda: handler.confirmed == [message.callback], what="confirmation")
        assert hub.frames_of("agent:transmit:request")[-1]["accessToken"] == "standin-token-2"


async def test_text_json_cannot_carry_is_replaced_not_fatal(hub: MedplumStandIn) -> None:
    handler = RecordingHandler()
    async with running_link(hub, handler) as link:
        await eventually(lambda: link.live, what="live")
        bad = m.TransmitRequest(remote="r", content_type=m.CONTENT_TYPE_HL7_V2, body="MSH|\udcff", callback="cb-1")
        assert link.send_transmit(bad)
        await eventually(lambda: handler.confirmed == ["cb-1"], what="confirmation")
        assert hub.frames_of("agent:transmit:request")[0]["body"] == "MSH|\ufffd"
        assert link.stats()["reconnects"] == 0


async def test_unanswered_transmits_are_reported_through_on_down(hub: MedplumStandIn) -> None:
    hub.transmit_reply = "none"
    handler = RecordingHandler()
    async with running_link(hub, handler) as link:
        await eventually(lambda: link.live, what="live")
        assert link.send_transmit(transmit(1))
        await eventually(lambda: link.stats()["unconfirmed"] == 1, what="sent")
        await hub.drop_agents()
        await eventually(lambda: len(handler.downs) == 1, what="on_down")
        assert handler.confirmed == []
        await eventually(lambda: link.live, what="live again")
        assert link.stats()["unconfirmed"] == 0


# -- link: hub requests and bad frames -----------------------------------------------------------


async def test_hub_requests_are_answered_with_their_callback(hub: MedplumStandIn) -> None:
    handler = RecordingHandler()
    async with running_link(hub, handler) as link:
        await eventually(lambda: link.live, what="live")
        outbound = {
            "type": "agent:transmit:request", "remote": "mllp://10.1.2.50:2575", "contentType": m.CONTENT_TYPE_HL7_V2,
            "body": "MSH|^~\\&|A|B|C|D|20240101||ORM^O01|OUT1|P|2.5.1",
        }
        reply = await hub.request(outbound)
        assert reply["type"] == "agent:transmit:response" and reply["statusCode"] == 200
        stats = await hub.request({"type": "agent:stats:request"})
        assert stats["type"] == "agent:stats:response" and stats["stats"] == {"live": True}
        error = await hub.request({"type": "agent:reloadconfig:request"})
        assert error["type"] == "agent:error" and "no address" in error["body"]
        legacy = await hub.request({**outbound, "type": "push"})  # legacy alias of a transmit request
        assert legacy["type"] == "agent:transmit:response"
        assert [type(r) for r in handler.requests] == [m.TransmitRequest, m.StatsRequest, m.ReloadConfigRequest, m.TransmitRequest]


async def test_unknown_type_gets_agent_error_with_callback(hub: MedplumStandIn) -> None:
    async with running_link(hub) as link:
        await eventually(lambda: link.live, what="live")
        reply = await hub.request({"type": "agent:frobnicate:request"})
        assert reply["type"] == "agent:error" and reply["body"] == "Unknown message type: agent:frobnicate:request"
        # an agent->hub type arriving at the agent is unknown to it as well
        reply = await hub.request({"type": "agent:connect:request", "accessToken": "x", "agentId": "y"})
        assert reply["body"] == "Unknown message type: agent:connect:request"


async def test_malformed_frames_get_agent_error(hub: MedplumStandIn) -> None:
    async with running_link(hub) as link:
        await eventually(lambda: link.live, what="live")
        missing_field = await hub.request({"type": "agent:transmit:response", "remote": "r"})
        assert missing_field["type"] == "agent:error"
        assert missing_field["body"].startswith("WebSocket error on incoming message: ")
        for junk in ("this is not json", "[1, 2, 3]", '{"type": 7}'):
            await hub.push(junk)
        await eventually(lambda: len(hub.frames_of("agent:error")) == 4, what="error replies")
        errors = hub.frames_of("agent:error")[1:]
        assert all(e["body"].startswith("WebSocket error on incoming message: ") and "callback" not in e for e in errors)
        # the server's own agent:error without a waiter is only logged; the link stays up
        await hub.push({"type": "agent:error", "body": "Something odd"})
        await hub.request({"type": "agent:heartbeat:request"})
        assert link.live and len(hub.frames_of("agent:error")) == 4


# -- link: failures and recovery -----------------------------------------------------------------


async def test_bad_credentials_are_logged_and_retried_with_backoff(
    hub: MedplumStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    handler = RecordingHandler()
    async with running_link(hub, handler, client_secret="wrong") as link:
        await eventually(lambda: len(hub.token_requests) >= 3, what="retries")
        assert not link.live and handler.lives == []
        assert "check client_id and client_secret" in (link.last_error or "")
        assert hub.connections == 0
    assert any("authentication failed" in r.getMessage() for r in caplog.records)
    assert handler.downs == []


async def test_dead_link_is_detected_by_heartbeats(hub: MedplumStandIn) -> None:
    handler = RecordingHandler()
    async with running_link(hub, handler) as link:
        await eventually(lambda: link.live, what="live")
        hub.silent = True  # TCP stays up, nothing comes back
        await eventually(lambda: len(handler.downs) == 1, what="dead link detection")
        assert "dead link" in handler.downs[0]
        hub.silent = False
        await eventually(lambda: len(handler.lives) == 2 and link.live, what="reconnect")
        assert hub.connections >= 2 and link.stats()["reconnects"] >= 1


async def test_not_live_socket_is_replaced(hub: MedplumStandIn) -> None:
    hub.silent = True  # the connect request is "lost"
    async with running_link(hub) as link:
        await eventually(lambda: hub.connections >= 2, what="second socket")
        assert not link.live
        hub.silent = False
        await eventually(lambda: link.live, what="live")


async def test_reconnects_after_server_restart(hub: MedplumStandIn) -> None:
    handler = RecordingHandler()
    async with running_link(hub, handler) as link:
        await eventually(lambda: link.live, what="live")
        await hub.stop()
        await eventually(lambda: len(handler.downs) == 1, what="on_down")
        assert not link.live and link.send_transmit(transmit(1)) is False
        await hub.start()  # same port
        await eventually(lambda: len(handler.lives) == 2 and link.live, what="live again")
        message = transmit(2)
        assert link.send_transmit(message)
        await eventually(lambda: handler.confirmed == [message.callback], what="confirmation")


async def test_rejected_token_is_replaced_before_the_next_attempt(hub: MedplumStandIn) -> None:
    handler = RecordingHandler()
    async with running_link(hub, handler) as link:
        await eventually(lambda: link.live, what="live")
        hub.revoke_tokens()
        await hub.drop_agents()  # reconnect with the cached, now invalid token -> "Invalid access token"
        await eventually(lambda: len(handler.lives) == 2 and link.live, what="live with a new token")
        assert hub.issued_tokens == ["standin-token-1", "standin-token-2"]
        assert hub.frames_of("agent:connect:request")[-1]["accessToken"] == "standin-token-2"


async def test_token_is_refreshed_before_expiry() -> None:
    async with MedplumStandIn(expires_in=1) as hub:  # effective margin: half the lifetime
        handler = RecordingHandler()
        async with running_link(hub, handler) as link:
            await eventually(lambda: link.live, what="live")
            # the client holds the new token (issued by the server is not enough: the reply may be in flight)
            await eventually(lambda: link.tokens.token in hub.issued_tokens[1:], what="refresh")
            message = transmit(1)
            assert link.send_transmit(message)
            await eventually(lambda: handler.confirmed == [message.callback], what="confirmation")
            assert hub.frames_of("agent:transmit:request")[-1]["accessToken"] in hub.issued_tokens[1:]
            assert hub.connections == 1 and handler.downs == []  # no reconnect was needed
        assert hub.violations == []


async def test_request_replies_and_timeouts(hub: MedplumStandIn) -> None:
    handler = RecordingHandler()
    link = AgentLink(settings_for(hub), handler)
    with pytest.raises(ConnectionError):
        await link.request(m.HeartbeatRequest())
    async with running_link(hub, handler) as link:
        await eventually(lambda: link.live, what="live")
        reply = await link.request(m.HeartbeatRequest())
        assert isinstance(reply, m.HeartbeatResponse) and reply.version == "4.0.0-standin"
        hub.answer_heartbeats = False
        with pytest.raises(TimeoutError, match="agent:heartbeat:request"):
            await link.request(m.HeartbeatRequest(), timeout=0.2)
        waiting = asyncio.ensure_future(link.request(m.HeartbeatRequest(), timeout=5.0))
        await asyncio.sleep(0.05)
        await hub.drop_agents()
        with pytest.raises(ConnectionError):
            await waiting


# -- TLS ----------------------------------------------------------------------------------------


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("neither the cryptography package nor openssl is available")
    cert, key = directory / "hub.crt", directory / "hub.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


async def test_wss_with_private_ca(tmp_path: Path) -> None:
    cert, key = _self_signed_cert(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    async with MedplumStandIn(ssl_context=server_tls) as hub:
        assert hub.base_url.startswith("https://")
        handler = RecordingHandler()
        async with running_link(hub, handler, ca_file=str(cert)) as link:
            await eventually(lambda: link.live, what="live over wss")
            message = transmit(1)
            assert link.send_transmit(message)
            await eventually(lambda: handler.confirmed == [message.callback], what="confirmation")
        async with running_link(hub) as untrusting:  # system CAs only: must refuse the hub
            await eventually(lambda: "certificate" in (untrusting.last_error or ""), what="TLS failure")
            assert not untrusting.live
        assert hub.violations == []


def test_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    settings = LinkSettings(
        base_url="https://hub.example.org/", client_id="c", client_secret="s", agent_id="a",
        ca_file=str(tmp_path / "missing.pem"),
    )
    with pytest.raises(LinkConfigError, match="missing.pem"):
        AgentLink(settings, RecordingHandler())


# -- the stand-in's reload-config option (used by the runtime's "reload during start-up" tests) --


class LiveOrderHandler(RecordingHandler):
    """Also records how many times the link had gone live when each hub request arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.lives_at_request: list[int] = []

    async def on_request(self, message: m.AgentMessage) -> m.AgentMessage | None:
        self.lives_at_request.append(len(self.lives))
        if isinstance(message, m.ReloadConfigRequest):
            self.requests.append(message)
            return m.ReloadConfigResponse(status_code=200)
        return await super().on_request(message)


async def test_standin_sends_reloadconfig_right_after_connect_and_on_demand() -> None:
    handler = LiveOrderHandler()
    async with MedplumStandIn(reload_after_connect=True) as hub, running_link(hub, handler):
        await eventually(lambda: len(hub.reload_replies) == 1, what="answer to the start-up reload")
        sent = hub.frames_of("agent:reloadconfig:response")
        assert hub.reload_requests_sent == 1 and hub.reload_replies == sent
        assert sent[0]["statusCode"] == 200 and sent[0]["callback"].startswith("Agent/agent-1-")
        # the request came in the same breath as the connect response, yet reached the handler
        # after on_live (the runtime is told it is live before it is asked to reload)
        assert [type(r) for r in handler.requests] == [m.ReloadConfigRequest] and handler.lives_at_request == [1]

        hub.reload_after_connect = False
        answer = await hub.reload_config()
        assert answer["type"] == "agent:reloadconfig:response" and answer["callback"] != sent[0]["callback"]
        assert hub.reload_requests_sent == 2 and hub.reload_replies[-1] == answer

        hub.reload_after_connect = True  # every new connection gets one
        await hub.drop_agents()
        await eventually(lambda: len(hub.reload_replies) == 3, what="answer after the reconnect")
        assert handler.lives_at_request == [1, 1, 2]
    assert hub.violations == []


async def test_standin_reload_answered_with_agent_error_is_recorded(hub: MedplumStandIn) -> None:
    async with running_link(hub) as link:  # RecordingHandler fails every reload
        await eventually(lambda: link.live, what="live")
        answer = await hub.reload_config()
        assert answer["type"] == "agent:error" and "no address" in answer["body"]
        assert hub.reload_replies == [answer] and hub.reload_requests_sent == 1
