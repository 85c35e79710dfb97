"""Channel list and pool options read from a remote hub's Agent/Endpoint resources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from medagent.runtime.remote_config import CACHE_FILENAME, fetch_remote_channels, pool_settings

AGENT = {
    "resourceType": "Agent", "id": "a1", "status": "active",
    "channel": [
        {"name": "adt-in", "endpoint": {"reference": "Endpoint/e1"}, "targetReference": {"reference": "Bot/b1"}},
        {"name": "off-one", "endpoint": {"reference": "Endpoint/e2"}},
        {"name": "broken", "endpoint": {"reference": "Endpoint/e3"}},
    ],
}
ENDPOINTS = {
    "Endpoint/e1": {"resourceType": "Endpoint", "status": "active", "address": "mllp://0.0.0.0:2575?enhanced=aa"},
    "Endpoint/e2": {"resourceType": "Endpoint", "status": "off", "address": "mllp://0.0.0.0:2576"},
    "Endpoint/e3": {"resourceType": "Endpoint", "status": "active", "address": "mllp://0.0.0.0:2577?nonsense=1"},
}


class StaticFhir:
    """FHIR JSON as a hub would serve it (fixed documents), or a hub that cannot be reached."""

    def __init__(self, documents: dict[str, Any] | None) -> None:
        self.documents = documents

    async def fetch_json(self, path: str) -> dict[str, Any]:
        if self.documents is None:
            raise ConnectionError("hub unreachable")
        return self.documents[path.removeprefix("/fhir/R4/")]


async def test_channels_from_the_hub_skip_off_and_report_invalid_endpoints(tmp_path: Path) -> None:
    reader = StaticFhir({"Agent/a1": AGENT, **ENDPOINTS})
    desired = await fetch_remote_channels(reader, "a1", tmp_path)
    channels = desired.channels
    assert [c.name for c in channels] == ["adt-in"]
    assert channels[0].mllp is not None and channels[0].mllp.ack_mode.value == "fast"
    assert channels[0].options is channels[0].mllp
    # The invalid endpoint is reported by name with the reason (a reload answers it), not dropped.
    assert list(desired.problems) == ["broken"] and "nonsense" in desired.problems["broken"]
    cache = tmp_path / CACHE_FILENAME
    assert cache.exists() and cache.stat().st_mode & 0o777 == 0o600


async def test_an_unreachable_hub_falls_back_to_the_cached_list(tmp_path: Path) -> None:
    await fetch_remote_channels(StaticFhir({"Agent/a1": AGENT, **ENDPOINTS}), "a1", tmp_path)
    desired = await fetch_remote_channels(StaticFhir(None), "a1", tmp_path)
    assert [c.name for c in desired.channels] == ["adt-in"] and list(desired.problems) == ["broken"]


async def test_no_hub_and_no_cache_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no cached list"):
        await fetch_remote_channels(StaticFhir(None), "a1", tmp_path)


async def test_agent_off_starts_no_channels(tmp_path: Path) -> None:
    reader = StaticFhir({"Agent/a1": {**AGENT, "status": "off"}, **ENDPOINTS})
    desired = await fetch_remote_channels(reader, "a1", tmp_path)
    assert desired.channels == () and not desired.problems


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ([], {"keep_alive": False}),
        ([{"name": "keepAlive", "valueBoolean": True}], {"keep_alive": True, "max_clients_per_remote": 1}),
        ([{"name": "maxClientsPerRemote", "valueInteger": 3}], {"keep_alive": False, "max_clients_per_remote": 3}),
        ([{"name": "maxClientsPerRemote", "valueInteger": 0}], {"keep_alive": False}),
    ],
)
def test_pool_settings_follow_medplum_agent_settings(settings: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    assert pool_settings({"setting": settings}) == expected
