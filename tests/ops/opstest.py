"""Helpers of the ops tests: start an agent against a hub, send HL7 over MLLP, call operations."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from medagent.config import load_config
from medagent.hub import AgentCredentials, HubServer
from medagent.ops.agent_ops import AgentOps
from medagent.runtime.agent import AgentRuntime

WAIT_S = 20.0
SB, EB, CR = b"\x0b", b"\x1c", b"\r"
#: A patient name that must never appear in a log (the PHI canary).
PHI_NAME = "ZEBRAFINCH^QUILLON"


def hl7(control_id: str) -> bytes:
    return (f"MSH|^~\\&|LAB|HOSP|MEDAGENT|CLOUD|20240101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r"
            f"PID|1||{control_id}^^^HOSP^MR||{PHI_NAME}||19700101|F\r").encode()


@dataclass
class OpsSite:
    hub: HubServer
    credentials: AgentCredentials
    runtime: AgentRuntime
    channel: str
    port: int

    @property
    def metrics_url(self) -> str:
        assert self.runtime.ops.metrics is not None
        return f"http://127.0.0.1:{self.runtime.ops.metrics.port}/metrics"


async def start_site(hub: HubServer, data_dir: Path, metrics_port: int | None = None, **agent: Any) -> OpsSite:
    credentials = hub.store.add_agent("ops-lab")
    hub.store.add_channel(credentials.agent_id, "adt-in", "mllp://127.0.0.1:0?ackMode=fast")
    overrides = {"agent": {"hub": hub.url, "client_id": credentials.client_id,
                           "client_secret": credentials.client_secret, "agent_id": credentials.agent_id,
                           "data_dir": str(data_dir), "reconnect_min_s": "0.05", "reconnect_max_s": "0.5",
                           **agent}}
    runtime = AgentRuntime(load_config(None, env={}, overrides=overrides))
    runtime.ops = AgentOps(runtime.stats, runtime.data_dir, metrics_port=metrics_port, sample_interval_s=0.2)
    await runtime.start()
    await until(lambda: runtime.link is not None and runtime.link.live, "the link to come up")
    channel = runtime.channels["adt-in"]
    return OpsSite(hub, credentials, runtime, "adt-in", channel.port)  # type: ignore[attr-defined]


async def until(predicate: Callable[[], Any], what: str) -> None:
    for _ in range(int(WAIT_S / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def send_messages(port: int, control_ids: list[str]) -> list[bytes]:
    """Send each message over one MLLP connection, lock-step; the ACKs in order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    acks = []
    try:
        for control_id in control_ids:
            writer.write(SB + hl7(control_id) + EB + CR)
            await writer.drain()
            acks.append(await asyncio.wait_for(reader.readuntil(EB + CR), WAIT_S))
    finally:
        writer.close()
        await writer.wait_closed()
    return acks


async def http(hub: HubServer, method: str, path: str, **kwargs: Any) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {hub.admin_token}"}
    async with aiohttp.ClientSession() as session, session.request(method, f"{hub.url}{path}", headers=headers,
                                                                   **kwargs) as response:
        return response.status, await response.text()
