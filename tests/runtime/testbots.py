"""Bots used by the end-to-end tests; the hub child imports them by name (PYTHONPATH is set)."""

from __future__ import annotations

import time

from medagent.hub.botrunner import inline_bot
from medagent.hub.hl7text import ack_text


def failing(event):  # noqa: ANN001, ANN201 - the bot signature is the hub's BotEvent
    raise RuntimeError("the bot could not file the message")


def slow(event):  # noqa: ANN001, ANN201
    time.sleep(3)
    return None


@inline_bot
def tagged(event):  # noqa: ANN001, ANN201
    """AA whose MSA-3 is the message's patient name (PID-5): tells which message an ACK answers."""
    pid = next(segment for segment in event.input.split("\r") if segment.startswith("PID|"))
    return ack_text(event.input, event.header, "AA", pid.split("|")[5])
