"""Helpers of the ops tests: start an agent against a hub, send HL7 over MLLP, call operations."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

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
    credentials = await hub.store.add_agent("ops-lab")
    await hub.store.add_channel(credentials.agent_id, "adt-in", "mllp://127.0.0.1:0?ackMode=fast")
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


class Sender:
    """Lock-step MLLP sender (a new connection per message, as many devices do) until stopped; ACK
    gaps measured. Like a real MLLP sender it sends a message again, on a new connection, when the
    connection closed before its ACK came (counted in ``resent``; an upgrade's switch closes idle
    connections of the old process)."""

    RESEND_LIMIT = 100  # per message, 0.05 s apart: an agent gone for 5 s fails the test

    def __init__(self, port: int) -> None:
        self.port = port
        self.acked: list[str] = []
        self.resent = 0
        self.longest_gap_s = 0.0
        self._stop = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        last = time.monotonic()
        for n in range(100_000):  # bounded; stopped long before
            if self._stop.is_set():
                return
            control_id = f"U{n}"
            ack = await self._deliver(control_id)
            assert b"MSA|AA|" + control_id.encode() in ack
            now = time.monotonic()
            self.longest_gap_s = max(self.longest_gap_s, now - last)
            last = now
            self.acked.append(control_id)
            await asyncio.sleep(0.02)

    async def _deliver(self, control_id: str) -> bytes:
        for attempt in range(self.RESEND_LIMIT):
            try:
                [ack] = await send_messages(self.port, [control_id])
                return ack
            except (asyncio.IncompleteReadError, ConnectionError):
                if attempt + 1 == self.RESEND_LIMIT:
                    raise
                self.resent += 1
                await asyncio.sleep(0.05)
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(self.task, WAIT_S)


async def hub_control_ids(site: OpsSite, expected: int, channel: str) -> list[str]:
    """The control ids the hub stored for ``channel`` (waits until ``expected`` are there, bounded)."""
    return await stored_control_ids(site.hub, site.credentials.agent_id, expected, channel)


async def stored_control_ids(hub: HubServer, agent_id: str, expected: int, channel: str) -> list[str]:
    """The control ids ``hub`` stored for the agent's ``channel`` (waits until ``expected`` are there, bounded)."""
    found: list[str] = []

    async def fetch() -> int:
        found.clear()
        params = {"agent": agent_id, "limit": "1000"}
        for _ in range(100):  # pages of 1000, bounded
            status, text = await http(hub, "GET", "/messages", params=params)
            assert status == 200
            page = orjson.loads(text)
            found.extend(m["control_id"] for m in page["messages"] if m["channel"] == channel)
            if page["next"] is None:
                break
            params["after"] = str(page["next"])
        return len(found)

    for _ in range(int(WAIT_S / 0.1)):
        if await fetch() >= expected:
            break
        await asyncio.sleep(0.1)
    return found


async def assert_nothing_lost(site: OpsSite, sender: Sender) -> None:
    """Every message the sender got an AA for is at the hub exactly once; no duplicate flagged."""
    ids = await hub_control_ids(site, len(sender.acked), site.channel)
    assert sorted(ids) == sorted(sender.acked), "every ACKed message at the hub exactly once"
    stats = site.runtime.ops.stats()
    assert stats["durableQueue"]["duplicates_flagged"] == 0
