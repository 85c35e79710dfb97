"""Bots shipped with the hub.

* ``medagent.hub.bots.ack:handler`` — answers every HL7 v2 message with an AA ACK (the default).
* ``medagent.hub.bots.adt_to_patient:handler`` — ADT^A01/A04/A08 to a FHIR R4 ``Patient``.

A bot is any importable callable ``module:function`` taking a
:class:`medagent.hub.botrunner.BotEvent`; see :mod:`medagent.hub.botrunner` for the contract.
"""

from medagent.hub.botrunner import BotEvent, BotReply, inline_bot

__all__ = ["BotEvent", "BotReply", "inline_bot"]
