"""Fixtures of the hub tests: a real HubServer on 127.0.0.1:0 with a temporary data directory,
on each store engine: SQLite (the default) and a real PostgreSQL (tests/engines/postgres.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from engines.postgres import postgres_server, postgres_url, store_url  # noqa: F401 - fixtures
from hubtest import hub_settings

from medagent.hub import AgentCredentials, HubServer
from medagent.hub.store import HubStore, open_store


@pytest.fixture
async def store(tmp_path: Path, store_url: str | None) -> AsyncIterator[HubStore]:  # noqa: F811 - the fixture
    """The store alone (no hub), opened as the hub opens it."""
    opened = await open_store(store_url, tmp_path / "hub")
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def hub(tmp_path: Path, store_url: str | None) -> AsyncIterator[HubServer]:  # noqa: F811 - the fixture
    server = HubServer(hub_settings(tmp_path, store=store_url))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def agent(hub: HubServer) -> AgentCredentials:
    """An agent with channels: adt (ack bot), adt-patient, boom, slow, async, slow-async, silent, json."""
    credentials = await hub.store.add_agent("lab")
    channels = {
        "adt": "medagent.hub.bots.ack:handler",
        "adt-patient": "medagent.hub.bots.adt_to_patient:handler",
        "counting": "hubtest_bots:counting",
        "boom": "hubtest_bots:explode",
        "slow": "hubtest_bots:sleepy",
        "async": "hubtest_bots:async_echo",
        "slow-async": "hubtest_bots:async_sleepy",
        "silent": "hubtest_bots:silent",
        "json": "hubtest_bots:as_json",
        "bad-return": "hubtest_bots:bad_return",
        "missing-bot": "hubtest_bots:does_not_exist",
    }
    for port, (name, bot) in enumerate(channels.items(), start=20000):
        await hub.store.add_channel(credentials.agent_id, name, f"mllp://0.0.0.0:{port}", bot)
    return credentials
