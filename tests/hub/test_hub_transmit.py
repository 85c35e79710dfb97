"""Inbound messages through the real hub: store, batch ack, bots, duplicates, failures."""

from __future__ import annotations

import hubtest_bots
import pytest
from hubtest import SpecAgent, adt, msa, transmit, wait_for

from medagent.hub import AgentCredentials, AgentStatus, HubServer, MessageQuery, MessageStatus
from medagent.hub.records import MessageRecord
from medagent.hub.store import NotFound


async def stored(hub: HubServer, callback: str) -> MessageRecord:
    """The message's row once its bot's result is recorded: a reply goes out before its result
    commits (the result rides the writer's next round), so a test reading right after a reply waits."""
    await wait_for(lambda: is_recorded(hub, callback))
    return await hub.store.get_message(callback)


async def is_recorded(hub: HubServer, callback: str) -> bool:
    try:
        return (await hub.store.get_message(callback)).processed_at is not None
    except NotFound:
        return False


async def has_status(hub: HubServer, callback: str, status: MessageStatus) -> bool:
    try:
        return (await hub.store.get_message(callback)).status is status
    except NotFound:
        return False


async def test_round_trip_through_ack_bot(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    await client.send(transmit("adt", adt("MSG00001"), "cb-1"))
    response = await client.recv_type("agent:transmit:response")
    assert response["callback"] == "cb-1"
    assert response["channel"] == "adt"
    assert response["remote"] == "10.1.2.3:50432"
    assert response["statusCode"] == 200
    assert response["contentType"] == "x-application/hl7-v2+er7"
    fields = msa(response["body"])
    assert fields[1] == "AA" and fields[2] == "MSG00001"
    assert response["body"].startswith("MSH|^~\\&|MEDAGENT|CLOUD|ADT1|HOSP|")
    record = await stored(hub, "cb-1")
    assert record.status is MessageStatus.PROCESSED
    assert (record.control_id, record.message_type, record.reply_status) == ("MSG00001", "ADT^A01", 200)
    assert record.duplicate == 0
    await client.close()


async def test_connect_response_advertises_batching(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    assert client.connect_response is not None
    assert client.connect_response["features"]["batch"]["maxMessages"] == hub.settings.batch_max_messages
    assert client.connect_response["features"]["batch"]["maxBytes"] == hub.settings.batch_max_bytes
    await client.close()


async def test_batch_is_acked_after_store_and_answered_in_batches(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    messages = [transmit("adt", adt(f"B{i:03d}"), f"batch-{i}") for i in range(50)]
    await client.send({"type": "agent:batch", "seq": 1, "messages": messages})
    frames: list[dict] = []
    ack = await client.recv_until(lambda f: frames.append(f) or f.get("type") == "agent:batch:ack")
    assert ack == {"type": "agent:batch:ack", "seq": 1}
    # the ack promises storage: every message of the batch is in the store now
    page = await hub.store.query_messages(MessageQuery(agent_id=agent.agent_id, limit=1000))
    assert {m.callback for m in page.messages} == {f"batch-{i}" for i in range(50)}
    responses = [m for f in frames if f["type"] == "agent:batch" for m in f["messages"]]
    responses += [f for f in frames if f["type"] == "agent:transmit:response"]
    for _ in range(50):
        if len(responses) >= 50:
            break
        frame = await client.recv()
        frames.append(frame)
        items = frame["messages"] if frame["type"] == "agent:batch" else [frame]
        responses += items
    assert any(f["type"] == "agent:batch" for f in frames), "responses to a batching agent come batched"
    assert sorted(r["callback"] for r in responses) == sorted(f"batch-{i}" for i in range(50))
    by_callback = {r["callback"]: msa(r["body"])[2] for r in responses}
    assert all(by_callback[f"batch-{i}"] == f"B{i:03d}" for i in range(50))
    await client.close()


async def test_no_reply_messages_are_processed_and_recorded_but_not_answered(
    hub: HubServer, agent: AgentCredentials
) -> None:
    client = await SpecAgent.connected(hub, agent)
    quiet = {**transmit("adt", adt("Q1"), "quiet-1"), "noReply": True}
    await client.send({"type": "agent:batch", "seq": 1, "messages": [quiet, transmit("adt", adt("L1"), "loud-1")]})
    answered: list[str] = []
    while "loud-1" not in answered:
        frame = await client.recv_until(lambda f: f.get("type") in ("agent:batch", "agent:transmit:response"))
        answered += [item["callback"] for item in (frame["messages"] if frame["type"] == "agent:batch" else [frame])]
    assert "quiet-1" not in answered
    await wait_for(lambda: has_status(hub, "quiet-1", MessageStatus.PROCESSED))
    assert msa((await stored(hub, "quiet-1")).reply_body or "")[1] == "AA"
    await client.close()


async def test_cumulative_ack_over_several_batches(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    for seq in (1, 2, 3):
        await client.send({"type": "agent:batch", "seq": seq,
                           "messages": [transmit("adt", adt(f"S{seq}"), f"seq-{seq}")]})
    _, responses = await client.acked_responses(3, 3)
    assert sorted(r["callback"] for r in responses) == ["seq-1", "seq-2", "seq-3"]
    await client.close()


async def test_resend_is_flagged_duplicate_and_bot_not_rerun(hub: HubServer, agent: AgentCredentials) -> None:
    hubtest_bots.CALLS.clear()
    client = await SpecAgent.connected(hub, agent)
    await client.send(transmit("counting", adt("DUP1"), "dup-1"))
    first = await client.recv_type("agent:transmit:response")
    await client.close()

    # reconnect (as after a link loss) and resend the same callback
    client = await SpecAgent.connected(hub, agent)
    await client.send(transmit("counting", adt("DUP1"), "dup-1"))
    second = await client.recv_type("agent:transmit:response")
    assert second["body"] == first["body"]
    assert second["statusCode"] == first["statusCode"]
    assert hubtest_bots.CALLS.count("dup-1") == 1
    record = await stored(hub, "dup-1")
    assert record.duplicate == 1
    [only] = (await hub.store.query_messages(MessageQuery(control_id="DUP1"))).messages
    assert (only.id, only.duplicate) == (record.id, 1)
    await client.close()


async def test_duplicate_of_replays_the_original_reply(hub: HubServer, agent: AgentCredentials) -> None:
    hubtest_bots.CALLS.clear()
    client = await SpecAgent.connected(hub, agent)
    await client.send(transmit("counting", adt("ORIG"), "orig-1"))
    original = await client.recv_type("agent:transmit:response")
    await client.send({"type": "agent:batch", "seq": 1,
                       "messages": [transmit("counting", adt("ORIG"), "copy-1", duplicateOf="orig-1")]})
    [copy] = await client.responses(1)
    assert copy["callback"] == "copy-1"
    assert copy["body"] == original["body"]
    assert hubtest_bots.CALLS == ["orig-1"]
    assert (await hub.store.get_message("copy-1")).duplicate_of == "orig-1"  # a copy gets no result of its own
    await client.close()


async def test_bot_exception_gives_ae_and_is_recorded(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    await client.send(transmit("boom", adt("ERR1"), "boom-1"))
    response = await client.recv_type("agent:transmit:response")
    assert response["statusCode"] == 400
    assert response["contentType"] == "x-application/hl7-v2+er7"
    fields = msa(response["body"])
    assert fields[1] == "AE" and fields[2] == "ERR1"
    assert "KeyError" in fields[3] and "hubtest_bots:explode" in fields[3]
    assert "Traceback" not in response["body"]
    record = await stored(hub, "boom-1")
    assert record.status is MessageStatus.ERROR
    assert record.error is not None and "KeyError" in record.error
    await client.close()


async def test_bot_timeout_gives_ar(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    await client.send(transmit("slow-async", adt("SLOW1"), "slow-1"))
    await client.send(transmit("slow", adt("SLOW2"), "slow-2"))
    responses = {r["callback"]: r for r in await client.responses(2)}
    for callback, control_id in (("slow-1", "SLOW1"), ("slow-2", "SLOW2")):
        fields = msa(responses[callback]["body"])
        assert fields[1] == "AR" and fields[2] == control_id
        assert "did not answer within" in fields[3]
        assert responses[callback]["statusCode"] == 400
        assert (await stored(hub, callback)).status is MessageStatus.ERROR
    await client.close()


async def test_async_bot_reply(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    body = adt("ASYNC1")
    await client.send(transmit("async", body, "async-1"))
    response = await client.recv_type("agent:transmit:response")
    assert response["body"] == f"async:async:{len(body)}"
    assert (response["statusCode"], response["contentType"]) == (201, "text/plain")
    await client.close()


async def test_bot_reply_kinds(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    await client.send(transmit("silent", adt("N1"), "none-1"))
    await client.send(transmit("json", adt("J1"), "json-1"))
    await client.send(transmit("bad-return", adt("X1"), "bad-1"))
    await client.send(transmit("missing-bot", adt("M1"), "missing-1"))
    responses = {r["callback"]: r for r in await client.responses(4)}
    assert (responses["none-1"]["statusCode"], responses["none-1"]["body"]) == (204, "")
    assert responses["json-1"]["contentType"] == "application/json"
    assert responses["json-1"]["body"] == '{"channel":"json","remote":"10.1.2.3:50432"}'
    assert msa(responses["bad-1"]["body"])[1] == "AE"
    assert "could not be loaded" in msa(responses["missing-1"]["body"])[3]
    await client.close()


async def test_adt_to_patient_stores_a_patient(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    await client.send(transmit("adt-patient", adt("P1", mrn="MRN42"), "pat-1"))
    response = await client.recv_type("agent:transmit:response")
    assert msa(response["body"])[1] == "AA"
    [record] = await hub.store.find_resources("Patient")
    patient = record.resource
    assert patient["identifier"][0]["value"] == "MRN42"
    assert patient["identifier"][0]["system"] == "urn:hl7v2:assigning-authority:HOSP"
    assert patient["identifier"][0]["type"]["coding"][0]["code"] == "MR"
    assert patient["name"] == [{"family": "DOE", "given": ["JOHN", "Q"], "suffix": ["JR"], "prefix": ["DR"]}]
    assert patient["birthDate"] == "1980-01-02"
    assert patient["gender"] == "male"
    assert patient["address"][0] == {"line": ["1 MAIN ST", "APT 2"], "city": "TOWN", "state": "ST",
                                      "postalCode": "12345", "country": "USA", "use": "home"}
    assert patient["telecom"] == [{"system": "phone", "value": "555-1234", "use": "home"}]

    # an A08 for the same identifier updates the same resource
    update = adt("P2", mrn="MRN42").replace("ADT^A01^ADT_A01", "ADT^A08^ADT_A01").replace("|M|||", "|F|||")
    await client.send(transmit("adt-patient", update, "pat-2"))
    await client.recv_type("agent:transmit:response")
    [updated] = await hub.store.find_resources("Patient")
    assert updated.id == record.id and updated.resource["gender"] == "female"

    # other message types are rejected with AR
    other = adt("P3").replace("ADT^A01^ADT_A01", "ORU^R01^ORU_R01")
    await client.send(transmit("adt-patient", other, "pat-3"))
    reject = await client.recv_type("agent:transmit:response")
    assert msa(reject["body"])[1] == "AR" and "unsupported message type ORU\\S\\R01" in msa(reject["body"])[3]
    await client.close()


async def test_agent_off_refuses_transmit(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    await hub.store.set_agent_status(agent.agent_id, AgentStatus.OFF)
    await client.send(transmit("adt", adt("OFF1"), "off-1"))
    error = await client.recv_type("agent:error")
    assert error == {"type": "agent:error", "body": "Agent.status is currently set to off", "callback": "off-1"}
    assert (await hub.store.query_messages(MessageQuery(control_id="OFF1"))).messages == ()
    await client.close()


async def test_unknown_channel_and_non_hl7(hub: HubServer, agent: AgentCredentials) -> None:
    client = await SpecAgent.connected(hub, agent)
    await client.send(transmit("nope", adt("U1"), "unknown-1"))
    error = await client.recv_type("agent:error")
    assert (error["body"], error["callback"]) == ("Channel not found", "unknown-1")
    await client.send(transmit("adt", "just text", "text-1", content_type="text/plain"))
    await client.send({"type": "agent:transmit:request", "remote": "r", "contentType": "text/plain", "body": "x",
                       "callback": "nochan-1"})
    responses = {r["callback"]: r for r in await client.responses(1)}
    assert responses["text-1"]["statusCode"] == 400
    assert responses["text-1"]["contentType"] == "text/plain"
    assert "HL7 v2 messages only" in responses["text-1"]["body"]
    await wait_for(lambda: has_status(hub, "text-1", MessageStatus.ERROR))
    with pytest.raises(NotFound):
        await hub.store.get_message("unknown-1")
    await client.close()


async def test_an_agent_cannot_send_into_another_agents_channel(hub: HubServer, agent: AgentCredentials) -> None:
    """Issue 18 defect 6: agent B, without channels, sends a transmit for A's channel 'adt'."""
    intruder = await hub.store.add_agent("intruder")
    client = await SpecAgent.connected(hub, intruder)
    await client.send({"type": "agent:batch", "seq": 1, "messages": [transmit("adt", adt("X1"), "intrude-1")]})
    error = await client.recv_type("agent:error")
    assert (error["body"], error["callback"]) == ("Channel not found", "intrude-1")
    with pytest.raises(NotFound):
        await hub.store.get_message("intrude-1")
    assert (await hub.store.query_messages(MessageQuery(agent_id=intruder.agent_id))).messages == ()
    # A's own messages on the same channel name are still taken
    owner = await SpecAgent.connected(hub, agent)
    await owner.send(transmit("adt", adt("A1"), "own-1"))
    assert (await owner.responses(1))[0]["callback"] == "own-1"
    assert (await stored(hub, "own-1")).agent_id == agent.agent_id
    await client.close()
    await owner.close()


async def test_replies_follow_the_agent_to_its_new_connection(hub: HubServer, agent: AgentCredentials) -> None:
    first = await SpecAgent.connected(hub, agent)
    second = await SpecAgent.connected(hub, agent)  # the newest connection is the agent's current one
    await first.send(transmit("async", adt("MOVE1"), "move-1"))
    response = await second.recv_type("agent:transmit:response")
    assert response["callback"] == "move-1"
    await first.close()
    await second.close()


async def test_a_nul_character_never_fails_the_other_messages_of_a_batch(hub: HubServer, agent: AgentCredentials) -> None:
    """SQLite keeps it; PostgreSQL text cannot: that message alone is refused, its batch is stored."""
    client = await SpecAgent.connected(hub, agent)
    frames = [transmit("adt", adt("N1"), "nul-ok-1"), transmit("adt", adt("N2") + "\x00junk", "nul-bad"),
              transmit("adt", adt("N3"), "nul-ok-3")]
    await client.send({"type": "agent:batch", "seq": 1, "messages": frames})
    expected = 3 if hub.store.stores_nul else 2
    items: list[dict] = []

    def answered(frame: dict) -> bool:
        items.extend(frame["messages"] if frame.get("type") == "agent:batch" else [frame])
        responses = [i for i in items if i.get("type") == "agent:transmit:response"]
        return len(responses) == expected and (hub.store.stores_nul or any(i["type"] == "agent:error" for i in items))

    await client.recv_until(answered)
    assert {i["callback"] for i in items if i["type"] == "agent:transmit:response"} >= {"nul-ok-1", "nul-ok-3"}
    assert (await stored(hub, "nul-ok-3")).control_id == "N3"
    if hub.store.stores_nul:
        assert (await stored(hub, "nul-bad")).body.endswith("\x00junk")
    else:
        errors = [i for i in items if i["type"] == "agent:error"]
        assert [(e["callback"], "NUL character" in e["body"]) for e in errors] == [("nul-bad", True)]
        with pytest.raises(NotFound):
            await hub.store.get_message("nul-bad")
    await client.close()
