"""Reads the channel list from a remote hub the way Medplum's agent does (medplum-protocol.md §3.1).

`GET /fhir/R4/Agent/<id>`, then `GET /fhir/R4/<endpoint reference>` for each channel, and the
channel's bot reference. Endpoints with status "off" are skipped, as are all channels while the
Agent's status is "off". The last list that loaded is cached in the data directory, so an agent
that restarts while the hub is unreachable still opens its listeners and queues what arrives.

A channel whose endpoint cannot be used (bad URL, unknown parameter, a kind this version cannot
run) is not dropped silently: it is returned in ``DesiredChannels.problems`` with the reason, so
a reload keeps its running version and answers the hub with the reason.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

from medagent.channels.endpoint import EndpointError, parse_endpoint
from medagent.config import DEFAULT_BOT, ChannelConfig, KindUnavailable, channel_options
from medagent.runtime.channel_set import DesiredChannels
from medagent.storage.files import write_private_file

__all__ = ["CACHE_FILENAME", "fetch_remote_channels", "pool_settings"]

log = logging.getLogger("medagent.config")

CACHE_FILENAME = "remote-channels.json"


class FhirReader(Protocol):
    async def fetch_json(self, path: str) -> dict[str, Any]: ...


async def fetch_remote_channels(reader: FhirReader, agent_id: str, data_dir: Path) -> DesiredChannels:
    cache = data_dir / CACHE_FILENAME
    try:
        entries = await _read_entries(reader, agent_id)
    except Exception as exc:
        if not cache.exists():
            raise RuntimeError(f"cannot read the channel list from the hub ({exc}) and no cached list exists") from exc
        log.warning("cannot read the channel list from the hub (%s); using the cached list", exc)
        entries = json.loads(cache.read_text())
    else:
        write_private_file(cache, json.dumps(entries, indent=2).encode(), fsync=False)
    channels: list[ChannelConfig] = []
    problems: dict[str, str] = {}
    for entry in entries:
        name = str(entry.get("name", ""))
        try:
            channels.append(_channel(entry))
        except (EndpointError, KindUnavailable, KeyError) as exc:
            log.error("channel %s from the hub is invalid: %s", name, exc)
            problems[name] = f"invalid endpoint: {exc}"
    return DesiredChannels(tuple(channels), problems)


def pool_settings(agent: dict[str, Any]) -> dict[str, Any]:
    """Outbound pool options from Medplum's `Agent.setting[]` (keepAlive, maxClientsPerRemote)."""
    values = {s.get("name"): next((v for k, v in s.items() if k.startswith("value")), None)
              for s in agent.get("setting", []) if isinstance(s, dict)}
    keep_alive = values.get("keepAlive") is True
    options: dict[str, Any] = {"keep_alive": keep_alive}
    max_clients = values.get("maxClientsPerRemote")
    if isinstance(max_clients, int) and not isinstance(max_clients, bool) and max_clients > 0:
        options["max_clients_per_remote"] = max_clients
    elif keep_alive:
        options["max_clients_per_remote"] = 1  # Medplum's default with keepAlive
    return options


async def _read_entries(reader: FhirReader, agent_id: str) -> list[dict[str, str]]:
    agent = await reader.fetch_json(f"/fhir/R4/Agent/{agent_id}")
    if agent.get("status", "active") == "off":
        log.warning("Agent.status is off: no channels are started")
        return []
    entries = []
    for item in agent.get("channel", []):
        reference = (item.get("endpoint") or {}).get("reference")
        if not reference:
            continue
        endpoint = await reader.fetch_json(f"/fhir/R4/{reference}")
        if endpoint.get("status", "active") == "off":
            continue
        bot = DEFAULT_BOT
        bot_ref = (item.get("targetReference") or {}).get("reference")
        entries.append({"name": item.get("name", ""), "address": endpoint.get("address", ""), "bot": bot_ref or bot})
    return entries


def _channel(entry: dict[str, str]) -> ChannelConfig:
    endpoint = parse_endpoint(entry["address"])
    return ChannelConfig(name=entry["name"], endpoint=endpoint, bot=entry["bot"], options=channel_options(endpoint))

