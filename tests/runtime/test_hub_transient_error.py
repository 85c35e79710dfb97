"""A hub that could not store a message this time ("...; resend it") gets it again; a refusal
("Bot not found") fails the row for good. Real runtime, real queue, real websocket, against the
Medplum stand-in (tests/cloud), on both event loops.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from mllp_peer import AsyncMllpClient, free_port, hl7, msa
from test_reload_standin import ChannelListStandIn, agent_config, transmitted_control_ids, until

from medagent.runtime.agent import AgentRuntime


class FlakyStoreStandIn(ChannelListStandIn):
    """Answers the first transmit of each message with the hub's transient store error."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hold_agent_reads_until_reload = False
        self.reload_after_connect = False
        self.failed_once: set[str] = set()
        self.refuse: set[str] = set()  # control ids answered with a permanent refusal

    async def _on_transmit_request(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        control_id = str(frame.get("body", "")).split("\r", 1)[0].split("|")[9]
        if control_id in self.refuse:
            await self._send(ws, {"type": "agent:error", "body": "Bot not found", "callback": frame.get("callback")})
            return
        if control_id not in self.failed_once:
            self.failed_once.add(control_id)
            await self._send(ws, {"type": "agent:error", "callback": frame.get("callback"),
                                  "body": "The hub could not store the message (OperationalError); resend it"})
            return
        await super()._on_transmit_request(ws, frame)

    # the stand-in dispatches through a class-level table of functions
    _HANDLERS = {**ChannelListStandIn._HANDLERS, "agent:transmit:request": _on_transmit_request}


async def test_transient_hub_error_is_resent_and_refusal_fails(tmp_path) -> None:
    standin = FlakyStoreStandIn()
    await standin.start()
    port = free_port()
    standin.addresses["adt-in"] = f"mllp://127.0.0.1:{port}?ackMode=fast"
    standin.refuse.add("REFUSED")
    runtime = AgentRuntime(agent_config(standin, tmp_path / "data"))
    await runtime.start()
    try:
        client = await AsyncMllpClient.connect(port)
        assert msa(await client.roundtrip(hl7("RESEND"))) == ("AA", "RESEND")
        assert msa(await client.roundtrip(hl7("REFUSED"))) == ("AA", "REFUSED")
        await client.close()
        sent_twice = lambda: [  # noqa: E731
            f for f in standin.frames_of("agent:transmit:request") if "|RESEND|" in str(f.get("body", ""))
        ]
        await until(lambda: len(sent_twice()) >= 2, "the resend after the transient error")
        assert "RESEND" in transmitted_control_ids(standin)
        assert runtime.queue is not None
        await until(lambda: runtime.queue.stats().get("failed", 0) == 1, "the refused row failed")  # type: ignore[union-attr]
        failed = runtime.queue.stats()
        assert failed.get("failed") == 1, failed
    finally:
        await runtime.stop()
        await standin.stop()
