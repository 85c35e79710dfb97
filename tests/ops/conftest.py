"""Fixtures of the ops tests: a real HubServer and an in-process AgentRuntime linked to it on 127.0.0.1.

The agent is a remote-hub agent (as deployed): the hub holds its channel list (one fast-mode MLLP
channel on port 0), the agent reads it, binds, links up, and the test talks to both over real
sockets. Both are stopped at teardown; every wait is bounded.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opstest import OpsSite, start_site

from medagent.hub import HubServer, HubSettings


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[HubServer]:
    server = HubServer(HubSettings(data_dir=tmp_path / "hub", port=0, heartbeat_interval_s=30.0))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def site(hub: HubServer, tmp_path: Path) -> AsyncIterator[OpsSite]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # what `medagent serve` sets by default (log_level = "INFO")
    try:
        running = await start_site(hub, tmp_path / "agent", metrics_port=0)
        try:
            yield running
        finally:
            await running.runtime.stop()
    finally:
        root.setLevel(level)
