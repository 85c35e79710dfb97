"""FHIR R4 JSON shapes the hub returns: OperationOutcome, Parameters, Bundle, Agent, Endpoint, Bot.

The Agent/Endpoint shapes follow what the Medplum agent reads (medplum-protocol.md §3.1):
``Agent{id, name, status, setting[], channel[{name, endpoint.reference, targetReference.reference}]}``
and ``Endpoint{id, status, address, name}``. A medagent Bot names its Python callable in the
extension :data:`BOT_CALLABLE_URL`. Pure functions, no I/O.
"""

from __future__ import annotations

import datetime
from typing import Any

import orjson
from aiohttp import web

from medagent.hub.records import AgentRecord, BotRecord, ChannelRecord

__all__ = [
    "FHIR_JSON",
    "BOT_CALLABLE_URL",
    "outcome",
    "outcome_error",
    "fhir_response",
    "error_response",
    "all_ok",
    "parameters",
    "parameters_to_dict",
    "bundle",
    "agent_resource",
    "endpoint_resource",
    "bot_resource",
    "iso_instant",
]

FHIR_JSON = "application/fhir+json"
BOT_CALLABLE_URL = "https://medagent.dev/fhir/StructureDefinition/bot-callable"
_ALL_OK = {"resourceType": "OperationOutcome", "id": "allok",
           "issue": [{"severity": "information", "code": "informational", "details": {"text": "All OK"}}]}


def outcome(text: str, code: str = "processing", severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code, "details": {"text": text}}]}


def outcome_error(text: str, code: str = "processing") -> bytes:
    return orjson.dumps(outcome(text, code))


def fhir_response(resource: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(resource), status=status, content_type=FHIR_JSON)


def error_response(status: int, text: str, code: str = "processing") -> web.Response:
    """An OperationOutcome error with HTTP ``status``."""
    return web.Response(body=outcome_error(text, code), status=status, content_type=FHIR_JSON)


def all_ok() -> web.Response:
    return fhir_response(_ALL_OK)


def parameters(**values: tuple[str, Any]) -> dict[str, Any]:
    """``Parameters`` from ``name=(value_type, value)``, e.g. ``status=("valueCode", "connected")``."""
    return {"resourceType": "Parameters",
            "parameter": [{"name": name, kind: value} for name, (kind, value) in values.items()]}


def parameters_to_dict(resource: dict[str, Any]) -> dict[str, Any]:
    """The ``value[x]`` of each parameter of a ``Parameters`` resource, by name."""
    result: dict[str, Any] = {}
    for entry in resource.get("parameter") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        for key, value in entry.items():
            if key.startswith("value"):
                result[entry["name"]] = value
                break
    return result


def bundle(resources: list[dict[str, Any]], bundle_type: str = "searchset") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": bundle_type, "total": len(resources),
            "entry": [{"resource": r} for r in resources]}


def iso_instant(epoch_s: float) -> str:
    return datetime.datetime.fromtimestamp(epoch_s, datetime.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def _setting(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"name": name, "valueBoolean": value}
    if isinstance(value, int):
        return {"name": name, "valueInteger": value}
    if isinstance(value, float):
        return {"name": name, "valueDecimal": value}
    return {"name": name, "valueString": str(value)}


def agent_resource(agent: AgentRecord, channels: list[ChannelRecord]) -> dict[str, Any]:
    return {
        "resourceType": "Agent",
        "id": agent.id,
        "meta": {"lastUpdated": iso_instant(agent.updated_at / 1000)},
        "name": agent.name,
        "status": agent.status.value,
        "setting": [_setting(name, value) for name, value in sorted(agent.settings.items())],
        "channel": [
            {"name": c.name, "endpoint": {"reference": f"Endpoint/{c.id}"},
             "targetReference": {"reference": f"Bot/{c.bot_id}"}}
            for c in channels
        ],
    }


def endpoint_resource(channel: ChannelRecord) -> dict[str, Any]:
    scheme = channel.address.partition("://")[0]
    return {
        "resourceType": "Endpoint",
        "id": channel.id,
        "status": channel.status.value,
        "name": channel.name,
        "address": channel.address,
        "connectionType": {"code": scheme},
        "payloadType": [{"text": scheme}],
    }


def bot_resource(bot: BotRecord) -> dict[str, Any]:
    return {
        "resourceType": "Bot",
        "id": bot.id,
        "name": bot.name,
        "runtimeVersion": "python",
        "extension": [{"url": BOT_CALLABLE_URL, "valueString": bot.callable}],
    }
