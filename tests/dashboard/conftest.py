"""Fixtures of the dashboard tests: a real HubServer on 127.0.0.1:0 in a temporary directory, on
each store engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dashsupport import PROXY_VARIABLES, DashboardClient
from engines.postgres import postgres_server, postgres_url, store_url  # noqa: F401 - fixtures

from medagent.hub import AgentCredentials, HubServer, HubSettings

ACK_BOT = "medagent.hub.bots.ack:handler"
MISSING_BOT = "dashboard_no_such_module:handler"


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
async def hub(tmp_path: Path, store_url: str | None) -> AsyncIterator[HubServer]:  # noqa: F811 - the fixture
    """A hub on each store engine (SQLite, PostgreSQL: tests/engines/postgres.py)."""
    server = HubServer(HubSettings(data_dir=tmp_path / "hub", store=store_url, port=0, heartbeat_interval_s=30.0,
                                   bot_timeout_s=2.0))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def agent(hub: HubServer) -> AgentCredentials:
    """Agent 'lab': channel adt (the ACK bot) and channel broken (a bot that cannot be imported)."""
    credentials = await hub.store.add_agent("lab")
    await hub.store.add_channel(credentials.agent_id, "adt", "mllp://0.0.0.0:2575", ACK_BOT)
    await hub.store.add_channel(credentials.agent_id, "broken", "mllp://0.0.0.0:2576", MISSING_BOT)
    return credentials


@pytest.fixture
async def client(hub: HubServer) -> AsyncIterator[DashboardClient]:
    c = DashboardClient(hub)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def admin(client: DashboardClient) -> DashboardClient:
    response = await client.login()
    assert response.status == 303
    return client
