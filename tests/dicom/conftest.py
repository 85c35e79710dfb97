"""Fixtures of the DICOM tests: a real hub on 127.0.0.1:0 with its DICOMweb service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dicomtest import hub_server

from medagent.hub import HubServer


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[HubServer]:
    server = hub_server(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
