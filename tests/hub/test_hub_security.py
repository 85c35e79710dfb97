"""Issue 13 defect 4 and issue 18 (hub side): token claims Medplum's client checks, revocation,
a rate-limited token endpoint, log flooding, query validation, private data files.

Everything runs against a real HubServer on 127.0.0.1:0 with real HTTP and websockets.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hubtest import SpecAgent, admin_headers, get_token, hub_settings
from websockets.exceptions import ConnectionClosed

from medagent.hub import AgentCredentials, HubServer
from medagent.hub.admin import MAX_INSTANT_MS, BadQuery, parse_instant_ms, parse_int
from medagent.hub.auth import load_or_create_secret_file
from medagent.hub.ratelimit import RateLimiter
from medagent.ops.logs import RateLimitedLog


def medplum_parse_jwt_payload(token: str) -> dict[str, Any]:
    """What @medplum/core's parseJWTPayload does: the middle part, base64url, JSON."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def medplum_verify_tokens(token: str, client_id: str) -> None:
    """MedplumClient.verifyTokens (v4): not expired; cid, else client_id, equal to its client id."""
    claims = medplum_parse_jwt_payload(token)
    if time.time() * 1000 >= claims["exp"] * 1000:
        raise AssertionError("Token expired")
    if "cid" in claims:
        if claims["cid"] != client_id:
            raise AssertionError("Token not issued for this audience")
    elif claims.get("client_id") != client_id:
        raise AssertionError("Token not issued for this audience")


async def http(method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as response:
        text = await response.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return response.status, dict(response.headers), body


# -- issue 13 defect 4: Medplum's client accepts our tokens -----------------------------------------------


async def test_token_carries_the_claims_medplum_client_checks(hub: HubServer, agent: AgentCredentials) -> None:
    token = await get_token(hub, agent)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "HS256", "typ": "JWT"}
    medplum_verify_tokens(token, agent.client_id)
    claims = medplum_parse_jwt_payload(token)
    assert claims["client_id"] == agent.client_id and claims["sub"] == agent.agent_id
    assert claims["iss"] == f"{hub.url}/"
    assert claims["exp"] - claims["iat"] == hub.settings.token_ttl_s
    assert "login_id" not in claims  # no /auth/me on this hub: MedplumClient would call it
    with pytest.raises(AssertionError, match="audience"):
        medplum_verify_tokens(token, "another-client")


# -- token revocation --------------------------------------------------------------------------------------


async def read_own_agent(hub: HubServer, agent: AgentCredentials, token: str) -> int:
    status, _, _ = await http("GET", f"{hub.url}/fhir/R4/Agent/{agent.agent_id}",
                              headers={"Authorization": f"Bearer {token}"})
    return status


async def wait_closed(client: SpecAgent) -> None:
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(5):
            for _ in range(200):
                await client.recv()


@pytest.mark.parametrize("how", ["revoke-tokens", "secret", "off"])
async def test_revoked_tokens_are_refused_and_the_websocket_closed(
        hub: HubServer, agent: AgentCredentials, how: str) -> None:
    old = await get_token(hub, agent)
    assert await read_own_agent(hub, agent, old) == 200
    client = await SpecAgent.connected(hub, agent)
    if how == "off":
        status, _, body = await http("PUT", f"{hub.url}/admin/agents/{agent.agent_id}/status",
                                     headers=admin_headers(hub), json={"status": "off"})
    else:
        status, _, body = await http("POST", f"{hub.url}/admin/agents/{agent.agent_id}/{how}", headers=admin_headers(hub))
    assert status in (200, 201), body
    if how == "revoke-tokens":
        assert body["connections_closed"] == 1 and body["token_generation"] == 1
    await wait_closed(client)
    assert await read_own_agent(hub, agent, old) == 401
    retry = await SpecAgent.open(hub)  # the old token cannot open a new session either
    await retry.send({"type": "agent:connect:request", "accessToken": old, "agentId": agent.agent_id})
    assert (await retry.recv_type("agent:error"))["body"] == "Invalid access token"
    await retry.close()
    if how == "secret":
        agent = AgentCredentials(agent.agent_id, agent.client_id, body["client_secret"])
    fresh = await get_token(hub, agent)  # logging in again works (with the new secret after a rotation)
    assert await read_own_agent(hub, agent, fresh) == 200


async def test_revoking_an_unknown_agent_is_404(hub: HubServer) -> None:
    status, _, _ = await http("POST", f"{hub.url}/admin/agents/nobody/revoke-tokens", headers=admin_headers(hub))
    assert status == 404


# -- rate-limited token endpoint ---------------------------------------------------------------------------


@pytest.fixture
async def strict_hub(tmp_path: Path) -> AsyncIterator[HubServer]:
    server = HubServer(hub_settings(tmp_path, token_burst_per_client=2, token_requests_per_client_per_min=1,
                                    token_burst_per_address=4, token_requests_per_address_per_min=1))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def post_token(hub: HubServer, client_id: str, secret: str) -> tuple[int, dict[str, str], Any]:
    return await http("POST", f"{hub.url}/oauth2/token",
                      data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret})


async def test_token_endpoint_is_rate_limited_per_client_and_per_address(strict_hub: HubServer) -> None:
    lab = await strict_hub.store.add_agent("lab")
    assert (await post_token(strict_hub, lab.client_id, lab.client_secret))[0] == 200
    assert (await post_token(strict_hub, lab.client_id, "wrong"))[0] == 401
    status, headers, body = await post_token(strict_hub, lab.client_id, lab.client_secret)
    assert status == 429 and body["error"] == "too_many_requests"
    assert 1 <= int(headers["Retry-After"]) <= 60
    # the address bucket (4) runs out too, whatever client id is tried
    assert (await post_token(strict_hub, "other-client", "x"))[0] == 401
    status, headers, _ = await post_token(strict_hub, "third-client", "x")
    assert status == 429 and int(headers["Retry-After"]) >= 1


def test_rate_limiter_refills_and_stays_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, max_keys=3, clock=lambda: now[0])
    assert limiter.take("a") == 0.0 and limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(1.0)
    now[0] += 1.0
    assert limiter.take("a") == 0.0
    for key in "bcdefg":
        limiter.take(key)
    assert len(limiter) == 3
    assert RateLimiter.retry_after(0.01) == "1" and RateLimiter.retry_after(2.2) == "3"


# -- issue 18 defect 4: no log flooding --------------------------------------------------------------------


async def raw_request(hub: HubServer, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.readline()
    finally:
        writer.close()


BIG_HEADER = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"


async def test_bad_requests_get_400_and_one_short_log_line(hub: HubServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(20):
        assert (await raw_request(hub, BIG_HEADER)).startswith(b"HTTP/1.0 400")
    assert (await raw_request(hub, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")).startswith(b"HTTP/1.0 400")
    assert (await raw_request(hub, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200")
    lines = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith(("aiohttp", "medagent.hub.http"))]
    assert all(r.exc_info is None and r.exc_text is None for r in lines)
    assert all(len(r.getMessage()) < 300 and "aaaaaaaa" not in r.getMessage() for r in lines)
    big = [r for r in lines if "LineTooLong" in r.getMessage()]
    assert len(big) == 1 and "HTTP 400 from 127.0.0.1" in big[0].getMessage()
    assert len(lines) == 2  # one per kind of error, the 19 repeats suppressed


def test_rate_limited_log_counts_what_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("test.limited"), interval_s=10, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "test.limited")
    assert limited.warning("k", "bad thing %s", 1)
    assert not limited.warning("k", "bad thing %s", 2)
    assert not limited.warning("k", "bad thing %s", 3)
    assert limited.warning("other", "other thing")
    now[0] = 11.0
    assert limited.warning("k", "bad thing %s", 4)
    assert [r.getMessage() for r in caplog.records] == [
        "bad thing 1", "other thing", "bad thing 4 (2 similar suppressed in the last 11 s)"]


# -- issue 18 defect 5: query parameters validated ---------------------------------------------------------


@pytest.mark.parametrize("query, reason", [
    ("after=99999999999999999999", "after is out of range"),
    ("after=-1", "after is out of range"),
    ("after=1e5", "after must be an integer"),
    ("limit=0", "limit is out of range"),
    ("limit=1001", "limit is out of range"),
    ("limit=abc", "limit must be an integer"),
    ("since=99999999999999999999", "since is out of range"),
    ("until=99999999999999999999", "until is out of range"),
    ("since=1" + "0" * 70, "since is too long"),
    ("until=not-a-time", "until must be epoch milliseconds or an ISO 8601 time"),
    ("status=lost", "status must be one of"),
])
async def test_messages_query_out_of_range_is_400_with_the_reason(hub: HubServer, query: str, reason: str) -> None:
    status, _, body = await http("GET", f"{hub.url}/messages?{query}", headers=admin_headers(hub))
    assert status == 400, body
    assert body["resourceType"] == "OperationOutcome"
    assert reason in body["issue"][0]["details"]["text"]


async def test_messages_query_limits_that_are_in_range_work(hub: HubServer) -> None:
    status, _, body = await http("GET", f"{hub.url}/messages?after={2**63 - 1}&limit=1000&since=0"
                                 f"&until={MAX_INSTANT_MS}", headers=admin_headers(hub))
    assert status == 200 and body == {"messages": [], "next": None}


def test_the_shared_parsers_raise_a_clean_error() -> None:
    with pytest.raises(BadQuery, match="--after is out of range"):
        parse_int("99999999999999999999", "--after", 0, 0, 2**63 - 1)
    with pytest.raises(BadQuery, match="out of range"):
        parse_instant_ms("9999999999999999", "--since")
    assert parse_instant_ms("1970-01-01T00:00:01Z", "since") == 1000


# -- issue 18 defect 2 (hub side): private files whatever the umask --------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_data_directory_and_files_are_private_under_umask_022(tmp_path: Path, umask_022: None) -> None:
    data = tmp_path / "hub"
    data.mkdir(mode=0o755)
    (data / "hub.log").write_text("started\n")  # as the embedded hub's parent opens it
    os.chmod(data / "hub.log", 0o644)
    async with HubServer(hub_settings(tmp_path)) as hub:
        credentials = await hub.store.add_agent("lab")  # a write, so -wal and -shm exist
        await get_token(hub, credentials)
        assert mode(data) == 0o700
        for name in ("hub.sqlite3", "hub.sqlite3-wal", "hub.sqlite3-shm", "hub.log", "hub-signing-key", "admin-token"):
            assert mode(data / name) == 0o600, name


def test_an_existing_key_file_is_narrowed(tmp_path: Path, umask_022: None) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"secret")
    os.chmod(key, 0o644)
    assert load_or_create_secret_file(key, b"new") == b"secret"
    assert mode(key) == 0o600
