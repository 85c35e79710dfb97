"""A bot for the ASTM end-to-end test (the hub child imports it by name), and its unit test.

``lab_results`` reads the E1394 records of an ``x-application/astm-e1394`` message with
``medagent.proto.astm.parse_records`` and answers a JSON summary: what a lab integration bot
does first. The end-to-end test reads the summary back from the hub.
"""

from __future__ import annotations

import json

from medagent.hub.botrunner import BotReply
from medagent.proto.astm import header_identity, parse_records
from medagent.records import ASTM_CONTENT_TYPE


def lab_results(event):
    if event.content_type != ASTM_CONTENT_TYPE:
        raise ValueError(f"expected {ASTM_CONTENT_TYPE}, got {event.content_type}")
    records = parse_records(event.input)
    sender, control_id = header_identity(records)
    results = [{"test": r.components(3)[3], "value": r.field(4), "units": r.field(5)}
               for r in records if r.type == "R"]
    summary = {"types": "".join(r.type for r in records), "sender": sender, "controlId": control_id,
               "results": results}
    return BotReply(json.dumps(summary), content_type="application/json")


def test_lab_results_bot_summarises_records() -> None:
    class Event:
        content_type = ASTM_CONTENT_TYPE
        input = "H|\\^&|C1||Cobas^1\nP|1\nO|1\nR|1|^^^GLU|5.4|mmol/L\nL|1|N\n"

    reply = lab_results(Event())
    assert json.loads(reply.body) == {"types": "HPORL", "sender": "Cobas", "controlId": "C1",
                                      "results": [{"test": "GLU", "value": "5.4", "units": "mmol/L"}]}


def reading_ack(event):  # noqa: ANN001, ANN201 - the hub's BotEvent
    """A byte-stream bot: Medplum sends the frame as hex; answer ACK (0x06) + the frame's length, hex."""
    frame = bytes.fromhex(event.input)
    return BotReply((b"\x06" + str(len(frame)).encode()).hex(), content_type="application/octet-stream")


def test_reading_ack_bot() -> None:
    class Event:
        input = b"\x02T=37\x03".hex()

    assert bytes.fromhex(reading_ack(Event()).body) == b"\x066"
