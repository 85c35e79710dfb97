"""Answers the hub's requests to the agent (server -> agent frames), per medplum-protocol.md §2, §6.

* `agent:transmit:request` with an `mllp://` remote: send through the outbound client pool and
  answer with the device's ACK (200, HL7) or the error text (400, text/plain).
* `agent:transmit:request` with content type `x-application/ping`: run the OS ping (IPv4 address
  or host name only, like Medplum), answer with its output.
* `agent:reloadconfig:request`: re-read the channel set and rebind what changed.
* `agent:logs:request`: the last `limit` log records from the in-memory ring.
* `agent:stats:request`: the runtime's stats.
* `agent:upgrade:request`: self-upgrade is not implemented in this version -> agent:error.

Every answer echoes the request's callback (the link fills it in); an exception becomes an
`agent:error` carrying the callback (the link does that too).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import sys
from typing import TYPE_CHECKING

from medagent.channels.mllp_client import MllpClientError
from medagent.cloud.messages import (
    CONTENT_TYPE_HL7_V2,
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
)
from medagent.ops.logs import DEFAULT_LOG_LIMIT, LOG_RING

if TYPE_CHECKING:
    from medagent.runtime.agent import AgentRuntime

__all__ = ["RequestHandler"]

log = logging.getLogger("medagent.requests")

PING_TIMEOUT_S = 3.6
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


class RequestHandler:
    def __init__(self, runtime: AgentRuntime) -> None:
        self._runtime = runtime

    async def handle(self, message: AgentMessage) -> AgentMessage | None:
        if isinstance(message, TransmitRequest):
            if message.content_type == CONTENT_TYPE_PING:
                return await self._ping(message)
            return await self._push(message)
        if isinstance(message, ReloadConfigRequest):
            await self._runtime.reload_channels()
            return ReloadConfigResponse(status_code=200)
        if isinstance(message, LogsRequest):
            return LogsResponse(status_code=200, logs=LOG_RING.tail(message.limit or DEFAULT_LOG_LIMIT))
        if isinstance(message, StatsRequest):
            return StatsResponse(status_code=200, stats=self._runtime.stats())
        if isinstance(message, UpgradeRequest):
            return ErrorMessage(body="Self-upgrade is not supported by this medagent version; upgrade with pip")
        return ErrorMessage(body=f"Unsupported request: {message.TYPE}")

    async def _push(self, message: TransmitRequest) -> TransmitResponse:
        if not message.remote:
            raise ValueError("Missing remote address")
        try:
            reply = await self._runtime.pool.send(message.remote, message.body.encode("utf-8"), message.return_ack)
        except MllpClientError as exc:
            log.warning("outbound to %s failed: %s", message.remote, exc)
            return _text_reply(message, 400, str(exc))
        return TransmitResponse(
            remote=message.remote,
            content_type=CONTENT_TYPE_HL7_V2,
            body=reply.decode("utf-8", errors="replace"),
            status_code=200,
        )

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
