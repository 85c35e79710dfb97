"""BotRunner and the shipped bots, without the network."""

from __future__ import annotations

import pytest
from hubtest import adt, msa

from medagent.hub import BotEvent, BotReply
from medagent.hub.botrunner import BotKind, BotLoadError, BotRunner, load_bot
from medagent.hub.bots import adt_to_patient
from medagent.hub.hl7text import scan_header
from medagent.hub.records import MessageStatus


def event(text: str, content_type: str = "x-application/hl7-v2+er7") -> BotEvent:
    return BotEvent(input=text, header=scan_header(text), content_type=content_type, agent_id="a", channel="c",
                    remote="r", callback="cb", received_at=0)


def test_load_bot_kinds() -> None:
    assert load_bot("medagent.hub.bots.ack:handler").kind is BotKind.INLINE
    assert load_bot("medagent.hub.bots.adt_to_patient:handler").kind is BotKind.THREAD
    assert load_bot("hubtest_bots:async_echo").kind is BotKind.ASYNC
    for bad in ("nocolon", "no_such_module_xyz:f", "hubtest_bots:missing", "hubtest_bots:CALLS"):
        with pytest.raises(BotLoadError):
            load_bot(bad)


async def test_runner_outcomes() -> None:
    runner = BotRunner(workers=2, timeout_s=0.2)
    try:
        ok = await runner.run("medagent.hub.bots.ack:handler", event(adt("R1")))
        assert ok.status is MessageStatus.PROCESSED and msa(ok.reply.body)[1:3] == ["AA", "R1"]
        failed = await runner.run("hubtest_bots:explode", event(adt("R2")))
        assert failed.status is MessageStatus.ERROR and failed.reply.status_code == 400
        assert failed.error == "bot hubtest_bots:explode failed: KeyError: 'no such ward'"
        timed_out = await runner.run("hubtest_bots:async_sleepy", event(adt("R3")))
        assert msa(timed_out.reply.body)[1] == "AR"
        plain = await runner.run("hubtest_bots:explode", event("not hl7", content_type="text/plain"))
        assert (plain.reply.content_type, plain.reply.status_code) == ("text/plain", 400)
        assert plain.reply.body == plain.error
    finally:
        runner.close()


def test_adt_mapping_edge_cases() -> None:
    text = ("MSH|^~\\&|A|B|C|D|20240101||ADT^A04|X1|P|2.5.1\r"
            "PID|1||77^^^&1.2.3&ISO^MR~88^^^OTHER||O\\T\\BRIEN^ANNE||1975|U|||^^^^^^||^NET^Internet^anne@example.org")
    ev = event(text)
    pid = adt_to_patient._segment(text, "PID", "|")
    assert pid is not None
    patient = adt_to_patient.patient_from_pid(pid, adt_to_patient._delimiters("|", "^~\\&"))
    assert patient["identifier"][0] == {"value": "77", "system": "urn:oid:1.2.3",
                                        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                             "code": "MR"}]}}
    assert patient["identifier"][1]["system"] == "urn:hl7v2:assigning-authority:OTHER"
    assert patient["name"] == [{"family": "O&BRIEN", "given": ["ANNE"]}]
    assert patient["birthDate"] == "1975" and patient["gender"] == "unknown"
    assert "address" not in patient
    assert patient["telecom"] == [{"system": "email", "value": "anne@example.org"}]
    assert ev.header is not None


def test_bot_reply_dataclass_defaults() -> None:
    reply = BotReply("x")
    assert (reply.content_type, reply.status_code) == ("x-application/hl7-v2+er7", 200)


async def test_run_inline_gives_the_outcomes_of_run() -> None:
    """The intake runs inline bots (and bots that cannot load) with run_inline: same outcomes, no coroutine."""
    runner = BotRunner(workers=1, timeout_s=0.2)
    try:
        assert runner.is_inline("medagent.hub.bots.ack:handler") and runner.is_inline("hubtest_bots:does_not_exist")
        assert not runner.is_inline("hubtest_bots:counting") and not runner.is_inline("hubtest_bots:async_echo")
        cases = [("medagent.hub.bots.ack:handler", event(adt("I1"))),
                 ("medagent.hub.bots.ack:handler", event("not hl7", content_type="text/plain")),  # the bot raises
                 ("hubtest_bots:does_not_exist", event(adt("I2")))]
        for spec, bot_event in cases:
            inline, awaited = runner.run_inline(spec, bot_event), await runner.run(spec, bot_event)
            assert (inline.status, inline.error, inline.reply.status_code, inline.reply.content_type) == (
                awaited.status, awaited.error, awaited.reply.status_code, awaited.reply.content_type)
            if inline.reply.content_type == "text/plain":
                assert inline.reply.body == awaited.reply.body
            else:  # an ACK: its own control id and time differ, the MSA does not
                assert msa(inline.reply.body)[1:] == msa(awaited.reply.body)[1:]
        ok = runner.run_inline("medagent.hub.bots.ack:handler", event(adt("I3")))
        assert ok.status is MessageStatus.PROCESSED and msa(ok.reply.body)[1:3] == ["AA", "I3"]
        raised = runner.run_inline("medagent.hub.bots.ack:handler", event("not hl7", content_type="text/plain"))
        assert raised.status is MessageStatus.ERROR and raised.reply.status_code == 400
        assert raised.error is not None and raised.error.startswith("bot medagent.hub.bots.ack:handler failed: ValueError")
    finally:
        runner.close()
