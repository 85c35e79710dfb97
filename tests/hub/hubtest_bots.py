"""Bots used by the hub tests (referenced as "hubtest_bots:<name>")."""

from __future__ import annotations

import asyncio
import threading
import time

from medagent.hub import BotEvent, BotReply
from medagent.hub.hl7text import ack_text

CALLS: list[str] = []
_lock = threading.Lock()


def counting(event: BotEvent) -> str:
    with _lock:
        CALLS.append(event.callback or "")
    return ack_text(event.input, event.header, "AA")


def explode(event: BotEvent) -> str:
    raise KeyError("no such ward")


def sleepy(event: BotEvent) -> str:
    time.sleep(1.0)
    return "late"


async def async_echo(event: BotEvent) -> BotReply:
    await asyncio.sleep(0)
    return BotReply(f"async:{event.channel}:{len(event.input)}", content_type="text/plain", status_code=201)


async def async_sleepy(event: BotEvent) -> str:
    await asyncio.sleep(5)
    return "late"


def silent(event: BotEvent) -> None:
    return None


def as_json(event: BotEvent) -> dict[str, object]:
    return {"channel": event.channel, "remote": event.remote}


def bad_return(event: BotEvent) -> object:
    return 42
