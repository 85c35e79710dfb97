"""Fixtures of the hub tests: a real HubServer on 127.0.0.1:0 with a temporary data directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hubtest import hub_settings

from medagent.hub import AgentCredentials, HubServer


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[HubServer]:
    server = HubServer(hub_settings(tmp_path))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def agent(hub: HubServer) -> AgentCredentials:
    """An agent with channels: adt (ack bot), adt-patient, boom, slow, async, slow-async, silent, json."""
    credentials = hub.store.add_agent("lab")
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
        hub.store.add_channel(credentials.agent_id, name, f"mllp://0.0.0.0:{port}", bot)
    return credentials
