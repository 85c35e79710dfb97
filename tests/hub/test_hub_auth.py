"""OAuth2 client credentials, access tokens, the admin token."""

from __future__ import annotations

import base64
import stat
import time
from pathlib import Path

import aiohttp
import pytest
from hubtest import admin_headers, get_token, hub_settings

from medagent.hub import AgentCredentials, HubServer
from medagent.hub.auth import AuthError, TokenSigner, hash_secret, verify_secret


async def test_token_with_form_credentials(hub: HubServer, agent: AgentCredentials) -> None:
    async with aiohttp.ClientSession() as http:
        form = {"grant_type": "client_credentials", "client_id": agent.client_id, "client_secret": agent.client_secret}
        async with http.post(f"{hub.url}/oauth2/token", data=form) as response:
            assert response.status == 200
            assert response.headers["Cache-Control"] == "no-store"
            body = await response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == hub.settings.token_ttl_s
    assert hub.context.signer.verify(body["access_token"]).agent_id == agent.agent_id


async def test_token_with_http_basic(hub: HubServer, agent: AgentCredentials) -> None:
    basic = base64.b64encode(f"{agent.client_id}:{agent.client_secret}".encode()).decode()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{hub.url}/oauth2/token", data={"grant_type": "client_credentials"},
                             headers={"Authorization": f"Basic {basic}"}) as response:
            assert response.status == 200
            assert (await response.json())["token_type"] == "Bearer"


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        ({"grant_type": "client_credentials", "client_id": "CID", "client_secret": "wrong"}, 401, "invalid_client"),
        ({"grant_type": "client_credentials", "client_id": "nobody", "client_secret": "x"}, 401, "invalid_client"),
        ({"grant_type": "client_credentials", "client_id": "CID"}, 400, "invalid_request"),
        ({"grant_type": "password", "client_id": "CID", "client_secret": "x"}, 400, "unsupported_grant_type"),
    ],
)
async def test_token_errors(hub: HubServer, agent: AgentCredentials, form: dict[str, str], status: int,
                            error: str) -> None:
    form = {k: (agent.client_id if v == "CID" else v) for k, v in form.items()}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{hub.url}/oauth2/token", data=form) as response:
            assert response.status == status
            body = await response.json()
    assert body["error"] == error and body["error_description"]


async def test_operator_api_requires_the_admin_token(hub: HubServer, agent: AgentCredentials) -> None:
    token = await get_token(hub, agent)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{hub.url}/messages") as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await response.json())["resourceType"] == "OperationOutcome"
        async with http.get(f"{hub.url}/messages", headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 401
        async with http.get(f"{hub.url}/messages", headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 403
        async with http.post(f"{hub.url}/Agent/{agent.agent_id}/$push", json={},
                             headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 403
        async with http.get(f"{hub.url}/messages", headers=admin_headers(hub)) as response:
            assert response.status == 200
        async with http.get(f"{hub.url}/healthz") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ok"


async def test_admin_token_file_is_private_and_stable(tmp_path: Path) -> None:
    async with HubServer(hub_settings(tmp_path)) as hub:
        first = hub.admin_token
        token_file = hub.admin_token_file
        assert token_file is not None
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token_file.read_text().strip() == first
    async with HubServer(hub_settings(tmp_path)) as hub:
        assert hub.admin_token == first


async def test_admin_token_from_settings(tmp_path: Path) -> None:
    async with HubServer(hub_settings(tmp_path, admin_token="a-long-operator-token")) as hub:
        assert hub.admin_token == "a-long-operator-token"
        assert hub.admin_token_file is None


def test_token_signer_rejects_forgery_and_expiry() -> None:
    signer = TokenSigner(b"k" * 32, ttl_s=60)
    token = signer.issue("agent-1")
    assert signer.verify(token).agent_id == "agent-1"
    with pytest.raises(AuthError):
        TokenSigner(b"x" * 32, ttl_s=60).verify(token)
    header, payload, signature = token.split(".")
    forged_payload = base64.urlsafe_b64encode(b'{"sub":"agent-2","iat":0,"exp":9999999999}').rstrip(b"=").decode()
    with pytest.raises(AuthError):
        signer.verify(f"{header}.{forged_payload}.{signature}")
    with pytest.raises(AuthError, match="expired"):
        signer.verify(token, now=time.time() + 61)
    for junk in ("", "a.b", "a.b.c", token + "x"):
        with pytest.raises(AuthError):
            signer.verify(junk)


def test_secret_hashing() -> None:
    stored = hash_secret("s3cret")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert verify_secret("s3cret", stored)
    assert not verify_secret("s3cret!", stored)
    assert not verify_secret("s3cret", "garbage")
    assert hash_secret("s3cret") != stored  # salted
