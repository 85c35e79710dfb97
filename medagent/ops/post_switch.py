"""The post-switch health check: run by the new version's process right after it took over, before
it tells the old process ``healthy`` (medagent.ops.switch).

What it proves, within ``timeout_s``:

1. the link to the hub is live (websocket connected and authenticated) and the hub answers an
   authenticated REST read of this agent (``GET /fhir/R4/Agent/<id>``) over the same credentials;
2. one real HL7 message sent over MLLP to a temporary fast-mode channel on ``127.0.0.1:0``
   (:data:`HEALTH_CHANNEL`, run beside the real channels through ``ChannelSet.temporary``) is
   committed to this process's durable queue and answered ``AA``: the channel code, the HL7
   kernels, intake and the queue (with its lease) of the new version all work.

The health message is then delivered like any queued message. A medagent hub recognises
:data:`HEALTH_CHANNEL` as a probe: it answers ``AA``, stores nothing and runs no bot (unless the
site defined a real channel of that name). A Medplum server has no such channel: it answers
"Channel not found" (one ``WARNING`` line of the link per upgrade) and its plain protocol settles
the row as failed (one failed row per upgrade in ``medagent queue``).
Raises :class:`HealthCheckFailed` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from medagent.channels.endpoint import parse_endpoint
from medagent.config import ChannelConfig, channel_options

if TYPE_CHECKING:
    from medagent.runtime.agent import AgentRuntime

__all__ = ["HEALTH_CHANNEL", "HEALTH_ENDPOINT", "HealthCheckFailed", "post_switch_health"]

HEALTH_CHANNEL = "upgrade-health"
HEALTH_ENDPOINT = "mllp://127.0.0.1:0?ackMode=fast"
POLL_S = 0.05
_MESSAGE = ("MSH|^~\\&|MEDAGENT|UPGRADE|HEALTH|CHECK|20240101000000||ADT^A01^ADT_A01|SWITCH{n}|P|2.5.1\r"
            "EVN|A01|20240101000000\r")


class HealthCheckFailed(Exception):
    """The new process is not healthy; ``str()`` says which part failed."""


async def post_switch_health(runtime: AgentRuntime, timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await _link(runtime)
            await _message(runtime)
    except TimeoutError:
        raise HealthCheckFailed(f"post-switch health check: not healthy within {timeout_s:g} s") from None


async def _link(runtime: AgentRuntime) -> None:
    while runtime.link is None or not runtime.link.live:
        await asyncio.sleep(POLL_S)
    assert runtime.credentials is not None
    try:
        await runtime.link.fetch_json(f"/fhir/R4/Agent/{runtime.credentials.agent_id}")
    except Exception as exc:  # noqa: BLE001 - any failure of the hub round trip is the verdict
        raise HealthCheckFailed(f"post-switch health check: the hub did not answer ({exc})") from None


async def _message(runtime: AgentRuntime) -> None:
    assert runtime.channel_set is not None
    endpoint = parse_endpoint(HEALTH_ENDPOINT)
    config = ChannelConfig(name=HEALTH_CHANNEL, endpoint=endpoint, options=channel_options(endpoint))
    try:
        async with runtime.channel_set.temporary(config) as channel:
            port = channel.listening_sockets()[0].getsockname()[1]
            ack = await _exchange(port, _MESSAGE.format(n=int(time.time() * 1000)).encode())
    except RuntimeError as exc:
        raise HealthCheckFailed(f"post-switch health check: {exc}") from None
    if b"MSA|AA|" not in ack:
        msa = next((segment for segment in ack.split(b"\r") if segment.startswith(b"MSA|")), b"no MSA segment")
        raise HealthCheckFailed(f"post-switch health check: the ACK was not AA ({msa[:80].decode(errors='replace')})")


async def _exchange(port: int, message: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\x0b" + message + b"\x1c\r")
        await writer.drain()
        return await reader.readuntil(b"\x1c\r")
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise HealthCheckFailed(
            f"post-switch health check: the channel closed without an ACK ({type(exc).__name__})") from None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
