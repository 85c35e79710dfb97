"""Helpers for the hub tests: a plain websocket 'agent' speaking spec frames, and HTTP helpers.

The agent here is deliberately not medagent.cloud.link: the hub is tested against the wire
protocol itself (medplum-protocol.md), with frames written out as dicts.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from websockets.asyncio.client import ClientConnection, connect

from medagent.hub import AgentCredentials, HubServer, HubSettings

RECV_TIMEOUT_S = 5.0
MAX_SKIPPED_FRAMES = 200

ADT_A01 = (
    "MSH|^~\\&|ADT1|HOSP|MEDAGENT|CLOUD|20240101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r"
    "EVN|A01|20240101120000\r"
    "PID|1||{mrn}^^^HOSP^MR||DOE^JOHN^Q^JR^DR||19800102|M|||1 MAIN ST^APT 2^TOWN^ST^12345^USA^H||555-1234^PRN^PH\r"
    "PV1|1|I|WARD^1^A\r"
)


def hub_settings(tmp_path: Path, **overrides: object) -> HubSettings:
    """Settings for a test hub: port 0, a temporary data dir, short bot timeout, slow heartbeats."""
    values: dict[str, object] = {"data_dir": tmp_path / "hub", "port": 0, "bot_timeout_s": 0.3,
                                 "heartbeat_interval_s": 30.0}
    values.update(overrides)
    return HubSettings(**values)  # type: ignore[arg-type]


def adt(control_id: str = "MSG00001", mrn: str = "123") -> str:
    return ADT_A01.format(control_id=control_id, mrn=mrn)


def msa(ack: str) -> list[str]:
    """The MSA segment of an ACK text, split into fields (msa[1] = MSA-1 ...)."""
    for segment in ack.replace("\n", "\r").split("\r"):
        if segment.startswith("MSA|"):
            return segment.split("|")
    raise AssertionError("no MSA segment in the reply")


def admin_headers(hub: HubServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {hub.admin_token}"}


async def get_token(hub: HubServer, credentials: AgentCredentials, ssl_context: ssl.SSLContext | None = None) -> str:
    async with aiohttp.ClientSession() as http:
        form = {"grant_type": "client_credentials", "client_id": credentials.client_id,
                "client_secret": credentials.client_secret}
        async with http.post(f"{hub.url}/oauth2/token", data=form, ssl=ssl_context or False) as response:
            assert response.status == 200, await response.text()
            return (await response.json())["access_token"]


class SpecAgent:
    """A test double of an agent: a raw websocket that sends and receives spec frames."""

    def __init__(self, ws: ClientConnection, agent_id: str | None) -> None:
        self.ws = ws
        self.agent_id = agent_id
        self.connect_response: dict[str, Any] | None = None

    @classmethod
    async def open(cls, hub: HubServer, ssl_context: ssl.SSLContext | None = None) -> SpecAgent:
        ws = await asyncio.wait_for(connect(hub.ws_url, ssl=ssl_context, max_size=None), RECV_TIMEOUT_S)
        return cls(ws, None)

    @classmethod
    async def connected(cls, hub: HubServer, credentials: AgentCredentials,
                        ssl_context: ssl.SSLContext | None = None) -> SpecAgent:
        token = await get_token(hub, credentials, ssl_context)
        agent = await cls.open(hub, ssl_context)
        agent.agent_id = credentials.agent_id
        await agent.send({"type": "agent:connect:request", "accessToken": token, "agentId": credentials.agent_id})
        agent.connect_response = await agent.recv_type("agent:connect:response")
        return agent

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def send_raw(self, text: str) -> None:
        await self.ws.send(text)

    async def recv(self, timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        return orjson.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def recv_until(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        """The next frame for which ``wanted`` holds, skipping others (heartbeats, ...)."""
        async with asyncio.timeout(timeout):
            for _ in range(MAX_SKIPPED_FRAMES):
                frame = await self.recv(timeout)
                if wanted(frame):
                    return frame
        raise AssertionError("too many unrelated frames")

    async def recv_type(self, message_type: str, timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        return await self.recv_until(lambda f: f.get("type") == message_type, timeout)

    async def responses(self, count: int, timeout: float = RECV_TIMEOUT_S) -> list[dict[str, Any]]:
        """Collect ``count`` transmit responses, whether sent alone or inside agent:batch frames."""
        found: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            for _ in range(MAX_SKIPPED_FRAMES):
                if len(found) >= count:
                    break
                frame = await self.recv(timeout)
                items = frame["messages"] if frame.get("type") == "agent:batch" else [frame]
                found += [m for m in items if m.get("type") == "agent:transmit:response"]
        assert len(found) == count, f"expected {count} responses, got {len(found)}"
        return found

    async def acked_responses(self, seq: int, count: int,
                              timeout: float = RECV_TIMEOUT_S) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Read until the batches up to ``seq`` are acked and ``count`` transmit responses came,
        in whichever order the hub sends them (on SQLite an inline bot's reply leaves while its
        round commits, before the ack; PostgreSQL sends it after): (frames read, responses)."""
        frames: list[dict[str, Any]] = []
        found: list[dict[str, Any]] = []
        acked = 0
        async with asyncio.timeout(timeout):
            for _ in range(MAX_SKIPPED_FRAMES):
                if acked >= seq and len(found) >= count:
                    break
                frame = await self.recv(timeout)
                frames.append(frame)
                if frame.get("type") == "agent:batch:ack":
                    acked = max(acked, frame["seq"])
                items = frame["messages"] if frame.get("type") == "agent:batch" else [frame]
                found += [m for m in items if m.get("type") == "agent:transmit:response"]
        assert acked >= seq and len(found) == count, f"acked {acked} of {seq}, {len(found)} of {count} responses"
        return frames, found

    async def close(self) -> None:
        await self.ws.close()


def transmit(channel: str, body: str, callback: str, content_type: str = "x-application/hl7-v2+er7",
             remote: str = "10.1.2.3:50432", **extra: Any) -> dict[str, Any]:
    return {"type": "agent:transmit:request", "accessToken": "placeholder", "channel": channel, "remote": remote,
            "contentType": content_type, "body": body, "callback": callback, **extra}


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = RECV_TIMEOUT_S) -> None:
    """Poll ``predicate`` (plain, or returning an awaitable: a store read) until true, bounded by ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            outcome = predicate()
            if inspect.isawaitable(outcome):
                outcome = await outcome
            if outcome:
                return
            await asyncio.sleep(0.01)
