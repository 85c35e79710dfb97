"""Answers the hub's requests to the agent (server -> agent frames), per medplum-protocol.md §2, §6.

* `agent:transmit:request` to a device URL (`mllp://host:port?encoding=...`, ...): send the body
  text through the outbound sender of the URL's scheme (each kind encodes it for its remote, e.g.
  MLLP in the remote's `encoding`) and answer with the device's reply (200, its content type) or
  the error text (400, text/plain).
* `agent:transmit:request` with content type `x-application/ping`: run the OS ping (IPv4 address
  or host name only, like Medplum), answer with its output.
* `agent:reloadconfig:request`: re-read the channel set and apply it as a diff (runtime/channel_set);
  200 when every channel is as wanted, else `agent:error` naming each failed channel and why
  (the failed channels keep running as they were).
* `agent:logs:request`: the last `limit` (1..1000, default 20) records of the main log, kept in
  the in-memory ring (medagent.ops.logs); another limit is an `agent:error`.
* `agent:stats:request`: the stats document (medagent.ops.stats: Medplum's shape plus ours).
* `agent:upgrade:request {version?, force?}`: medagent.ops.upgrade decides with Medplum's
  semantics (refusals -> agent:error with the reason; same version -> 200 no-op) and, when it
  accepts, answers 200 at once while the upgrade runs in the background (its outcome is in the
  stats' ``upgrade`` section and the logs). Without an upgrader -> agent:error.

Every answer echoes the request's callback (the link fills it in); an exception becomes an
`agent:error` carrying the callback (the link does that too).

The handler gets only what it answers from: the reload operation, a stats provider and the
outbound senders (not the runtime).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from medagent.cloud.messages import (
    CONTENT_TYPE_PING,
    CONTENT_TYPE_TEXT,
    AgentMessage,
    ErrorMessage,
    LogsRequest,
    LogsResponse,
    ReloadConfigRequest,
    ReloadConfigResponse,
    StatsRequest,
    StatsResponse,
    TransmitRequest,
    TransmitResponse,
    UpgradeRequest,
    UpgradeResponse,
)
from medagent.ops.logs import DEFAULT_LOG_LIMIT, LOG_RING, MAX_LOG_LIMIT
from medagent.ops.upgrade import UpgradeRefused
from medagent.runtime.channel_set import ChangeReport
from medagent.runtime.outbound import OutboundSenders

__all__ = ["RequestHandler"]

log = logging.getLogger("medagent.requests")

PING_TIMEOUT_S = 3.6
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


class RequestHandler:
    def __init__(
        self,
        reload: Callable[[], Awaitable[ChangeReport]],
        stats: Callable[[], dict[str, Any]],
        senders: OutboundSenders,
        upgrade: Callable[[str | None, bool], str] | None = None,
    ) -> None:
        self._reload = reload
        self._stats = stats
        self._senders = senders
        self._upgrade = upgrade

    async def handle(self, message: AgentMessage) -> AgentMessage | None:
        if isinstance(message, TransmitRequest):
            if message.content_type == CONTENT_TYPE_PING:
                return await self._ping(message)
            return await self._push(message)
        if isinstance(message, ReloadConfigRequest):
            report = await self._reload()
            if not report.ok:
                return ErrorMessage(body=f"reload failed: {report.error_text()}")
            return ReloadConfigResponse(status_code=200)
        if isinstance(message, LogsRequest):
            limit = DEFAULT_LOG_LIMIT if message.limit is None else message.limit
            if not 0 < limit <= MAX_LOG_LIMIT:  # Medplum's agent: 0 < limit <= MAX_LOG_LIMIT
                return ErrorMessage(body=f"Invalid limit {limit}: the limit must be from 1 to {MAX_LOG_LIMIT}")
            return LogsResponse(status_code=200, logs=LOG_RING.tail(limit))
        if isinstance(message, StatsRequest):
            return StatsResponse(status_code=200, stats=self._stats())
        if isinstance(message, UpgradeRequest):
            if self._upgrade is None:
                return ErrorMessage(body="Self-upgrade is not available in this agent; upgrade with pip")
            try:
                outcome = self._upgrade(message.version, bool(message.force))
            except UpgradeRefused as exc:
                log.warning("upgrade request refused: %s", exc)
                return ErrorMessage(body=str(exc))
            log.info("upgrade request (version %s, force %s): %s", message.version or "latest", bool(message.force), outcome)
            return UpgradeResponse(status_code=200)
        return ErrorMessage(body=f"Unsupported request: {message.TYPE}")

    async def _push(self, message: TransmitRequest) -> TransmitResponse:
        if not message.remote:
            raise ValueError("Missing remote address")
        try:
            sender = self._senders.for_remote(message.remote)
            reply = await sender.send(message.remote, message.body, message.content_type, return_ack=message.return_ack)
        except Exception as exc:  # noqa: BLE001 - UnknownDestination and every OutboundError are a 400
            log.warning("outbound to %s failed: %s", message.remote, exc)
            return _text_reply(message, 400, str(exc) or type(exc).__name__)
        return TransmitResponse(remote=message.remote, content_type=reply.content_type, body=reply.body,
                                status_code=reply.status_code)

    async def _ping(self, message: TransmitRequest) -> TransmitResponse:
        host = message.remote.strip()
        try:
            count = _ping_count(message.body)
            _check_ping_host(host)
        except ValueError as exc:
            return _text_reply(message, 400, str(exc))
        flag = "/n" if sys.platform == "win32" else "-c"
        try:
            proc = await asyncio.create_subprocess_exec(
                "ping", flag, str(count), host, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
        except OSError as exc:
            return _text_reply(message, 400, f"cannot run ping: {exc}")
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), PING_TIMEOUT_S * count)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return _text_reply(message, 400, f"ping {host} timed out")
        text = out.decode("utf-8", errors="replace")
        if proc.returncode != 0:
            return _text_reply(message, 400, text or f"ping exited with {proc.returncode}")
        return TransmitResponse(remote=message.remote, content_type=CONTENT_TYPE_PING, body=text, status_code=200)


def _text_reply(request: TransmitRequest, status: int, text: str) -> TransmitResponse:
    return TransmitResponse(remote=request.remote, content_type=CONTENT_TYPE_TEXT, body=text, status_code=status)


def _ping_count(body: str) -> int:
    """Medplum's ping body: "", "PING" or "PING <count>"."""
    words = body.split()
    if not words:
        return 1
    if words[0].upper() != "PING" or len(words) > 2:
        raise ValueError("invalid ping body; expected 'PING' or 'PING <count>'")
    count = int(words[1]) if len(words) == 2 and words[1].isdigit() else 1 if len(words) == 1 else -1
    if not 1 <= count <= 100:
        raise ValueError("ping count must be a whole number from 1 to 100")
    return count


def _check_ping_host(host: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ValueError(f"invalid ping destination {host!r}") from None
        return
    if address.version == 6:
        raise ValueError("IPv6 ping destinations are not supported")
