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
