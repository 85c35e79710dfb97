"""A test peer that behaves like a plain Medplum server toward an agent (medplum-protocol.md §1, §2, §6).

It implements only what a Medplum server does for an agent:

* ``POST /oauth2/token`` — client-credentials grant; issues ``standin-token-<n>`` valid for
  ``expires_in`` seconds; wrong credentials get HTTP 400 ``{"error": "invalid_request", ...}``;
* ``GET /fhir/R4/Agent/<id>`` — the Agent resource, for a valid bearer token (else 401);
* ``/ws/agent`` — ``agent:connect:request`` (token + agent id checked; errors are callback-less
  ``agent:error`` frames and the socket stays open, as in Medplum), heartbeats both ways,
  ``agent:transmit:request`` answered with an ACK-like ``agent:transmit:response`` (or with an
  ``agent:error``, or not at all — see ``transmit_reply``), and unknown types answered with
  ``agent:error "Unknown message type: <t>"``.

It never advertises ``features``. It records every frame it receives (``frames``), and records a
*violation* for anything a real Medplum server would not accept from a drop-in agent: an
``agent:batch`` frame or a binary frame. Tests assert ``violations == []``.

Test controls: ``silent`` (swallow every frame: a dead link), ``answer_heartbeats``,
``transmit_reply``, ``revoke_tokens()``, ``push()`` / ``request()`` (hub -> agent), ``drop_agents()``,
``stop()`` / ``restart()`` (same port).

Reload config (medplum-protocol.md §2 ``agent:reloadconfig:request``; an operator's bulk
``$reload-config`` can reach an agent while it is still starting):

* ``reload_after_connect = True`` (constructor keyword or attribute): on every successful
  handshake the stand-in sends ``agent:reloadconfig:request`` (with a fresh callback) in the same
  handler, directly after ``agent:connect:response`` — before the agent can have sent anything
  else, i.e. while its start-up is still running;
* ``await reload_config(timeout=5.0)``: send one on demand to the connected agent and return the
  agent's answer (``agent:reloadconfig:response`` or ``agent:error`` with the same callback);
* every answer to either kind is recorded in ``reload_replies`` (in arrival order) and
  ``reload_requests_sent`` counts the requests, so a test can wait for
  ``len(reload_replies) == reload_requests_sent``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from aiohttp import WSMsgType, web

SERVER_VERSION = "4.0.0-standin"
MAX_FRAME_BYTES = 64 * 1024 * 1024


def ack_for(body: str) -> str:
    """An HL7 ACK-like reply to an ER7 message (MSA-2 = MSH-10), as a trivial Medplum bot returns."""
    msh = body.split("\r", 1)[0].split("|")
    control_id = msh[9] if len(msh) > 9 else ""
    swapped = "|".join(msh[i] if len(msh) > i else "" for i in (4, 5, 2, 3))
    return f"MSH|^~\\&|{swapped}|20240101120001||ACK|{control_id}-ACK|P|2.5.1\rMSA|AA|{control_id}|OK"


class MedplumStandIn:
    """See the module docstring."""

    def __init__(
        self,
        *,
        client_id: str = "standin-client",
        client_secret: str = "standin-secret",
        agent_id: str = "agent-1",
        expires_in: int = 3600,
        ssl_context: ssl.SSLContext | None = None,
        reload_after_connect: bool = False,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.agent_id = agent_id
        self.expires_in = expires_in
        self.ssl_context = ssl_context
        self.port = 0
        # observations
        self.frames: list[dict[str, Any]] = []
        self.raw_frames: list[str] = []
        self.violations: list[str] = []
        self.token_requests: list[dict[str, str]] = []
        self.issued_tokens: list[str] = []
        self.connections = 0
        self.connected_agents = 0  # sockets that got agent:connect:response
        # controls
        self.silent = False
        self.answer_heartbeats = True
        self.transmit_reply: Literal["response", "error", "none"] = "response"
        self.reload_after_connect = reload_after_connect
        self.reload_requests_sent = 0
        self.reload_replies: list[dict[str, Any]] = []
        self._reload_callbacks: set[str] = set()
        # internals
        self._valid_tokens: dict[str, float] = {}
        self._token_numbers = itertools.count(1)
        self._sockets: set[web.WebSocketResponse] = set()
        self._agent_socket: web.WebSocketResponse | None = None
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._runner: web.AppRunner | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/oauth2/token", self._token)
        app.router.add_get("/fhir/R4/Agent/{id}", self._agent_resource)
        app.router.add_get("/ws/agent", self._websocket)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Close every agent socket (1001 going away) and stop listening."""
        await self.drop_agents()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def drop_agents(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001, message=b"server restart")

    async def __aenter__(self) -> MedplumStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- hub -> agent -------------------------------------------------------------------------

    async def push(self, message: dict[str, Any] | str) -> None:
        """Send a frame (a dict as JSON, or a raw string) to the connected agent."""
        ws = self._agent_socket
        assert ws is not None and not ws.closed, "no agent is connected"
        await ws.send_str(message if isinstance(message, str) else json.dumps(message))

    async def request(self, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Push ``message`` with a fresh callback and return the agent's frame with that callback."""
        callback = f"Agent/{self.agent_id}-{uuid.uuid4()}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[callback] = future
        try:
            await self.push({**message, "callback": callback})
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._waiters.pop(callback, None)

    async def reload_config(self, timeout: float = 5.0) -> dict[str, Any]:
        """Send ``agent:reloadconfig:request`` to the connected agent; return its answer."""
        ws = self._agent_socket
        assert ws is not None and not ws.closed, "no agent is connected"
        callback = self._new_reload_callback(ws)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[callback] = future
        try:
            await self._send(ws, {"type": "agent:reloadconfig:request", "callback": callback})
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._waiters.pop(callback, None)

    def _new_reload_callback(self, ws: web.WebSocketResponse) -> str:
        """Register a reload request's callback (its answer goes to ``reload_replies``)."""
        callback = f"Agent/{self.agent_id}-{uuid.uuid4()}"
        self._reload_callbacks.add(callback)
        self.reload_requests_sent += 1
        return callback

    def revoke_tokens(self) -> None:
        self._valid_tokens.clear()

    def frames_of(self, message_type: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == message_type]

    # -- HTTP ---------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.token_requests.append(form)
        ok = (
            form.get("grant_type") == "client_credentials"
            and form.get("client_id") == self.client_id
            and form.get("client_secret") == self.client_secret
        )
        if not ok:
            return web.json_response(
                {"error": "invalid_request", "error_description": "Invalid client"}, status=400
            )
        token = f"standin-token-{next(self._token_numbers)}"
        self.issued_tokens.append(token)
        self._valid_tokens[token] = time.monotonic() + self.expires_in
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in})

    def _token_valid(self, token: object) -> bool:
        return isinstance(token, str) and self._valid_tokens.get(token, 0.0) > time.monotonic()

    async def _agent_resource(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not self._token_valid(token):
            return web.json_response({"resourceType": "OperationOutcome"}, status=401)
        agent_id = request.match_info["id"]
        if agent_id != self.agent_id:
            return web.json_response({"resourceType": "OperationOutcome"}, status=404)
        return web.json_response({"resourceType": "Agent", "id": agent_id, "name": "standin", "status": "active"})

    # -- websocket ----------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES)
        await ws.prepare(request)
        self.connections += 1
        self._sockets.add(ws)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    self.violations.append("binary frame (Medplum agents send JSON text frames)")
                    text = msg.data.decode("utf-8", "replace")
                elif msg.type == WSMsgType.TEXT:
                    text = msg.data
                else:
                    break
                if self.silent:
                    continue
                await self._on_frame(ws, text)
        finally:
            self._sockets.discard(ws)
            if self._agent_socket is ws:
                self._agent_socket = None
        return ws

    async def _on_frame(self, ws: web.WebSocketResponse, text: str) -> None:
        self.raw_frames.append(text)
        try:
            frame = json.loads(text)
        except ValueError:
            self.violations.append("frame is not JSON")
            return
        if not isinstance(frame, dict):
            self.violations.append("frame is not a JSON object")
            return
        self.frames.append(frame)
        message_type = frame.get("type")
        callback = frame.get("callback")
        if isinstance(callback, str) and callback in self._reload_callbacks:
            self._reload_callbacks.discard(callback)
            self.reload_replies.append(frame)
        waiter = self._waiters.get(callback) if isinstance(callback, str) else None
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)
            return
        handler = self._HANDLERS.get(message_type)  # type: ignore[arg-type]
        if handler is None:
            if message_type == "agent:batch":
                self.violations.append("agent:batch sent to a hub that did not advertise it")
            await self._send(ws, {"type": "agent:error", "body": f"Unknown message type: {message_type}", "callback": callback})
            return
        await handler(self, ws, frame)

    async def _send(self, ws: web.WebSocketResponse, message: dict[str, Any]) -> None:
        if not ws.closed:
            await ws.send_str(json.dumps({k: v for k, v in message.items() if v is not None}))

    async def _on_connect(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        if not frame.get("accessToken"):
            await self._send(ws, {"type": "agent:error", "body": "Missing access token"})
        elif not frame.get("agentId"):
            await self._send(ws, {"type": "agent:error", "body": "Missing agent ID"})
        elif not self._token_valid(frame["accessToken"]) or frame["agentId"] != self.agent_id:
            await self._send(ws, {"type": "agent:error", "body": "Invalid access token"})
        else:
            self._agent_socket = ws
            self.connected_agents += 1
            await self._send(ws, {"type": "agent:connect:response"})
            if self.reload_after_connect:
                callback = self._new_reload_callback(ws)
                await self._send(ws, {"type": "agent:reloadconfig:request", "callback": callback})

    async def _on_heartbeat_request(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        if self.answer_heartbeats:
            await self._send(
                ws, {"type": "agent:heartbeat:response", "version": SERVER_VERSION, "callback": frame.get("callback")}
            )

    async def _on_heartbeat_response(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        return None  # recorded in frames; Medplum stores the version for $status

    async def _on_transmit_request(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        callback = frame.get("callback")
        if not self._token_valid(frame.get("accessToken")):
            await self._send(ws, {"type": "agent:error", "body": "Invalid access token", "callback": callback})
            return
        if self.transmit_reply == "none":
            return
        if self.transmit_reply == "error":
            await self._send(ws, {"type": "agent:error", "body": "Bot not found", "callback": callback})
            return
        reply = {
            "type": "agent:transmit:response",
            "channel": frame.get("channel"),
            "remote": frame.get("remote"),
            "contentType": "x-application/hl7-v2+er7",
            "statusCode": 200,
            "body": ack_for(str(frame.get("body", ""))),
            "callback": callback,
        }
        await self._send(ws, reply)

    async def _on_agent_reply(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        return None  # a reply nobody waits for (Medplum: published to Redis, nobody subscribed)

    _HANDLERS: dict[str, Callable[[MedplumStandIn, web.WebSocketResponse, dict[str, Any]], Any]] = {
        "agent:connect:request": _on_connect,
        "agent:heartbeat:request": _on_heartbeat_request,
        "agent:heartbeat:response": _on_heartbeat_response,
        "agent:transmit:request": _on_transmit_request,
        "transmit": _on_transmit_request,
        "agent:transmit:response": _on_agent_reply,
        "agent:reloadconfig:response": _on_agent_reply,
        "agent:upgrade:response": _on_agent_reply,
        "agent:logs:response": _on_agent_reply,
        "agent:stats:response": _on_agent_reply,
        "agent:error": _on_agent_reply,
    }
