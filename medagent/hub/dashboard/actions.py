"""What an operator can do from the dashboard, through the hub's own paths.

* **Retry** a failed message (status ``error``): the hub has no retry operation, so this hands
  the stored message to the hub's existing dispatch path — :class:`~medagent.hub.intake.
  ChannelDispatcher` ``submit`` with an :class:`~medagent.hub.intake.BotJob`, exactly what the
  intake pipeline does for a new message: the channel's bot runs again (in the channel's FIFO,
  after what is queued), and the hub's writer records the new status, reply and processing time
  on the same row. The retry sets ``reply_wanted=False``: the device got its answer long ago,
  so the new reply is stored, not sent. A message already in flight is not submitted twice
  (the dispatcher's ``inflight`` set, as for resends), and the agent's backlog counter is
  reserved for it as intake does, so backpressure accounting stays exact.
* **Operations** call :mod:`medagent.hub.operations` (``$reload-config``, ``$fetch-logs``,
  ``$push`` with ``waitForResponse``, ``$stats``) with the same parameters as the HTTP API and
  turn their response or :class:`~medagent.hub.operations.OperationError` into an
  :class:`OperationResult` to show.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from medagent.cloud.messages import CONTENT_TYPE_HL7_V2
from medagent.hub import hl7text
from medagent.hub.context import HubContext
from medagent.hub.dashboard.queries import HubReader, MessageRow
from medagent.hub.intake import BotJob
from medagent.hub.operations import (
    OperationError,
    op_fetch_logs,
    op_push,
    op_reload_config,
    op_stats,
)
from medagent.hub.records import ChannelStatus, IncomingMessage, MessageStatus
from medagent.hub.store import NotFound

__all__ = [
    "OperationResult",
    "RetryError",
    "agent_stats",
    "fetch_logs",
    "push_message",
    "reload_config",
    "retry_message",
]

#: how often a retry's outcome is polled for (bounded by the bot timeout + RETRY_GRACE_S)
_POLL_S = 0.05
RETRY_GRACE_S = 2.0


class RetryError(ValueError):
    """A message that cannot be retried now (the text says why)."""


@dataclass(frozen=True, slots=True)
class OperationResult:
    ok: bool
    title: str
    detail: str = ""


async def retry_message(ctx: HubContext, reader: HubReader, row: MessageRow) -> MessageRow:
    """Run the channel's bot again on a failed message; the row after the new outcome (or as is on timeout)."""
    if row.status != MessageStatus.ERROR.value:
        raise RetryError(f"only failed messages can be retried; this one is {row.status}")
    dispatcher = ctx.dispatcher
    if row.callback in dispatcher.inflight:
        raise RetryError("this message is being processed right now")
    texts = await reader.run(reader.message_texts, row.id)
    if texts is None:
        raise RetryError("the message is gone")
    body = texts[0]
    header = hl7text.scan_header(body) if row.content_type == CONTENT_TYPE_HL7_V2 else None
    found = await ctx.store.channel_bot(row.agent_id, row.channel)
    bot, refusal = None, None
    if found is None:
        refusal = f"channel {row.channel!r} is not configured for this agent on the hub"
    elif found[0].status is not ChannelStatus.ACTIVE:
        refusal = f"channel {row.channel!r} is off on the hub"
    else:
        bot = found[1].callable
    message = IncomingMessage(
        agent_id=row.agent_id, channel=row.channel, remote=row.remote, callback=row.callback,
        content_type=row.content_type, body=body, received_at=row.received_at, control_id=row.control_id,
        message_type=row.message_type, reply_wanted=False,
    )
    await dispatcher.backlog(row.agent_id).reserve(1)  # released by the dispatcher after the bot ran
    dispatcher.inflight.add(row.callback)
    dispatcher.submit([BotJob(message, header, bot, refusal)])
    deadline = asyncio.get_running_loop().time() + ctx.settings.bot_timeout_s + RETRY_GRACE_S
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(_POLL_S)
        if row.callback in dispatcher.inflight:
            continue
        current = await reader.run(reader.message, row.id)
        if current is not None and current.processed_at != row.processed_at:
            return current
    return await reader.run(reader.message, row.id) or row


def _outcome_text(response: web.StreamResponse) -> str:
    body = getattr(response, "body", None)
    return body.decode(errors="replace") if isinstance(body, bytes) else ""


def _parameter(response: web.StreamResponse, name: str) -> str:
    """The ``valueString`` of parameter ``name`` in a FHIR ``Parameters`` response."""
    document = orjson.loads(getattr(response, "body", b"{}") or b"{}")
    for parameter in document.get("parameter", []):
        if parameter.get("name") == name:
            return str(parameter.get("valueString", ""))
    return ""


async def _run(title: str, call: Any) -> tuple[OperationResult, web.StreamResponse | None]:
    try:
        response = await call
    except OperationError as exc:
        return OperationResult(False, f"{title} failed", str(exc)), None
    except NotFound as exc:
        return OperationResult(False, f"{title} failed", str(exc)), None
    return OperationResult(True, f"{title} done"), response


async def reload_config(ctx: HubContext, agent_id: str) -> OperationResult:
    result, _ = await _run("Reload", op_reload_config(ctx, agent_id, {}))
    if result.ok:
        return OperationResult(True, "Reload done", "the agent applied its configuration")
    return result


async def fetch_logs(ctx: HubContext, agent_id: str, limit: int) -> OperationResult:
    result, response = await _run("Fetch logs", op_fetch_logs(ctx, agent_id, {"limit": str(limit)}))
    if response is None:
        return result
    logs = _parameter(response, "logs")
    return OperationResult(True, f"Fetched {len(logs.splitlines())} log lines", logs)


async def push_message(ctx: HubContext, agent_id: str, params: Mapping[str, Any]) -> OperationResult:
    result, response = await _run("Push", op_push(ctx, agent_id, {**params, "waitForResponse": True}))
    if response is None:
        return result
    return OperationResult(response.status < 400, f"Push answered with status {response.status}",
                           _outcome_text(response))


async def agent_stats(ctx: HubContext, agent_id: str, timeout_ms: int = 2000) -> dict[str, Any] | None:
    """The agent's ``$stats`` object, or ``None`` when it is not connected or does not answer."""
    _, response = await _run("Stats", op_stats(ctx, agent_id, {"timeout": str(timeout_ms)}))
    if response is None:
        return None
    try:
        stats = orjson.loads(_parameter(response, "stats") or "{}")
    except orjson.JSONDecodeError:
        return None
    return stats if isinstance(stats, dict) else None
