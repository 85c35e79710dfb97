"""Helpers of the dashboard tests: a logged-in HTTP client and a real AgentLink for the hub.

``DashboardClient`` is an aiohttp session against a real HubServer on 127.0.0.1 (its cookie jar
accepts cookies from an IP host, as browsers do). ``running_link`` connects a real
:class:`medagent.cloud.link.AgentLink` whose handler answers the hub's requests like a small
runtime (push, reload, logs, stats). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import aiohttp

from medagent.cloud import messages as m
from medagent.cloud.link import AgentLink, LinkSettings
from medagent.hub import AgentCredentials, HubServer

ADT = "MSH|^~\\&|ADT1|HOSP|MEDAGENT|CLOUD|20240101120000||ADT^A01^ADT_A01|MSG{n:05d}|P|2.5.1\rPID|1||SECRET-MRN-{n}\r"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy", "wss_proxy")
_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    for _ in range(int(timeout / 0.02)):
        if await predicate() if asyncio.iscoroutinefunction(predicate) else predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class DashboardClient:
    def __init__(self, hub: HubServer) -> None:
        self.hub = hub
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def close(self) -> None:
        await self.http.close()

    async def login(self, user: str = "", password: str | None = None) -> aiohttp.ClientResponse:
        form = {"user": user, "password": self.hub.admin_token if password is None else password, "next": "/dashboard/"}
        response = await self.http.post(self.hub.url + "/dashboard/login", data=form, allow_redirects=False)
        await response.read()
        if response.status == 303:
            await self.page("/dashboard/")
        return response

    async def get(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        response = await self.http.get(self.hub.url + path, allow_redirects=False, **kwargs)
        await response.read()
        return response

    async def page(self, path: str) -> str:
        response = await self.get(path)
        assert response.status == 200, (path, response.status, await response.text())
        text = await response.text()
        if match := _CSRF.search(text):
            self.csrf = match.group(1)
        return text

    async def post(self, path: str, data: Mapping[str, str] | None = None, *, csrf: str | None = None,
                   headers: Mapping[str, str] | None = None) -> aiohttp.ClientResponse:
        form = dict(data or {})
        form["csrf"] = self.csrf if csrf is None else csrf
        response = await self.http.post(self.hub.url + path, data=form, headers=headers, allow_redirects=False)
        await response.read()
        return response

    async def first_event(self, path: str = "/dashboard/events") -> dict[str, Any]:
        """The first snapshot of an event stream (the stream is closed afterwards)."""
        return (await self.events(path, lambda _: True))

    async def events(self, path: str, wanted: Callable[[dict[str, Any]], bool], limit: int = 15) -> dict[str, Any]:
        """The first snapshot for which ``wanted`` holds, among the first ``limit`` (one per second)."""
        import orjson

        async with self.http.get(self.hub.url + path) as response:
            assert response.status == 200, response.status
            assert response.headers["Content-Type"].startswith("text/event-stream")
            async with asyncio.timeout(limit + 10):
                for _ in range(limit * 4):
                    line = await response.content.readline()
                    if line.startswith(b"data: "):
                        snapshot = orjson.loads(line[6:])
                        if wanted(snapshot):
                            return snapshot
        raise AssertionError("no wanted snapshot event")


class RuntimeLikeHandler:
    """A LinkHandler answering hub requests as the runtime does (medagent/runtime/requests.py)."""

    def __init__(self) -> None:
        self.requests: list[m.AgentMessage] = []
        self.confirmed: list[str] = []
        self.reload_error: str | None = None
        self.stats_calls = 0

    def on_live(self, features: Mapping[str, Any]) -> None:
        pass

    def on_down(self, reason: str) -> None:
        pass

    def on_confirmed(self, callbacks: Sequence[str]) -> None:
        self.confirmed.extend(callbacks)

    def on_transmit_response(self, message: m.TransmitResponse) -> None:
        pass

    def on_transmit_error(self, callback: str, reason: str) -> None:
        pass

    async def on_request(self, message: m.AgentMessage) -> m.AgentMessage | None:
        self.requests.append(message)
        if isinstance(message, m.TransmitRequest):
            return m.TransmitResponse(remote=message.remote, content_type=m.CONTENT_TYPE_HL7_V2,
                                      body="MSH|^~\\&|DEV|X|||||ACK|1|P|2.5.1\rMSA|AA|PUSHED", status_code=200)
        if isinstance(message, m.ReloadConfigRequest):
            if self.reload_error:
                return m.ErrorMessage(body=self.reload_error)
            return m.ReloadConfigResponse(status_code=200)
        if isinstance(message, m.LogsRequest):
            return m.LogsResponse(status_code=200, logs=[{"level": "INFO", "msg": f"line {i}"} for i in range(3)])
        if isinstance(message, m.StatsRequest):
            self.stats_calls += 1
            k = self.stats_calls  # cumulative counters grow by 8 + 1 + 1 answers per request
            return m.StatsResponse(status_code=200, stats={
                "implementation": "cython", "extensionsActive": True, "link": {"last_ping_ms": 1.5, "unconfirmed": 0},
                "durableQueue": {"submitted_waiting": 0, "ready_in_memory": 2, "backlog_on_disk": 0, "inflight": 1,
                                 "store": {"pending": 3, "channels": {"adt": {"pending": 3, "oldest_pending_age_s": 2.0}}}},
                "channelStats": {"adt": {"kind": "mllp", "connectionsOpen": 2, "unitsIn": 10, "errors": 0,
                                         "answers": {"AA": 10 * k}, "latencyMs": {"0.5": 8 * k, "1": k, "5": k}}},
            })
        return None


@contextlib.asynccontextmanager
async def running_link(hub: HubServer, agent: AgentCredentials, handler: RuntimeLikeHandler) -> AsyncIterator[AgentLink]:
    link = AgentLink(LinkSettings(
        base_url=hub.url, client_id=agent.client_id, client_secret=agent.client_secret, agent_id=agent.agent_id,
        heartbeat_s=0.2, reconnect_min_s=0.02, reconnect_max_s=0.2, request_timeout_s=5.0,
    ), handler)
    await link.start()
    try:
        await eventually(lambda: link.live and hub.context.registry.current(agent.agent_id) is not None, what="link live")
        yield link
    finally:
        await link.close()


def transmits(agent_id: str, channel: str, count: int, start: int = 0) -> list[m.TransmitRequest]:
    return [m.TransmitRequest(remote="10.1.2.3:50432", content_type=m.CONTENT_TYPE_HL7_V2, body=ADT.format(n=n),
                              channel=channel, callback=m.new_callback(agent_id))
            for n in range(start, start + count)]
