"""The default bot: acknowledge every HL7 v2 message with AA (HL7 v2 ch. 2.9.2).

The hub has already stored the message before any bot runs, so this bot stores nothing; it
returns the application ACK built by :func:`medagent.proto.hl7.build_ack` (MSA-2 = MSH-10,
sender and receiver swapped, MSH-12 version and MSH-18 charset kept). It runs on the event loop
(:func:`~medagent.hub.botrunner.inline_bot`): building an ACK takes microseconds.

A message without a readable MSH raises, so the hub answers 400 and records the error.
"""

from __future__ import annotations

from medagent.hub import hl7text
from medagent.hub.botrunner import BotEvent, inline_bot

__all__ = ["handler"]


@inline_bot
def handler(event: BotEvent) -> str:
    """The AA ACK of ``event.input``."""
    if event.header is None:
        raise ValueError(f"the ack bot handles HL7 v2 messages only; this {event.content_type} message has no MSH")
    return hl7text.ack_text(event.input, event.header, "AA")
