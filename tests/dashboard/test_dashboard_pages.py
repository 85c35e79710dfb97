"""What an operator sees and does: agents, live figures, messages, bodies, retry, operations.

Real HubServer on 127.0.0.1:0 and a real AgentLink (medagent.cloud.link) connected to it; the
messages are sent by the link and stored, processed and failed by the hub itself.
"""

from __future__ import annotations

import asyncio
import re

from dashsupport import DashboardClient, RuntimeLikeHandler, eventually, running_link, transmits

from medagent.hub import AgentCredentials, HubServer
from medagent.hub.dashboard import STATIC_DIR
from medagent.hub.dashboard.accounts import DashboardDB
from medagent.hub.dashboard.markup import Markup, render
from medagent.hub.records import MessageQuery, MessageStatus

ACK_BOT = "medagent.hub.bots.ack:handler"


async def _stored(hub: HubServer, **query: object) -> list:
    return list((await hub.store.query_messages(MessageQuery(limit=1000, **query))).messages)  # type: ignore[arg-type]


async def _send(hub: HubServer, link: object, agent: AgentCredentials, channel: str, count: int, start: int = 0) -> None:
    before = len(await _stored(hub, channel=channel))
    for message in transmits(agent.agent_id, channel, count, start):
        assert link.send_transmit(message)  # type: ignore[attr-defined]

    async def processed() -> bool:
        rows = await _stored(hub, channel=channel)
        return len(rows) >= before + count and all(r.processed_at is not None for r in rows)

    await eventually(processed, what=f"{count} processed messages on {channel}")


async def test_overview_shows_the_agent_online_with_live_counts(hub: HubServer, agent: AgentCredentials,
                                                              admin: DashboardClient) -> None:
    page = await admin.page("/dashboard/")
    assert "lab" in page and 'class="badge offline"' in page
    first = await admin.first_event()
    assert first["agents"][agent.agent_id]["online"] is False and first["total"] == 0
    handler = RuntimeLikeHandler()
    async with running_link(hub, agent, handler) as link:
        await _send(hub, link, agent, "adt", 5)
        page = await admin.page("/dashboard/")
        assert 'class="badge online"' in page
        snapshot = await admin.first_event()
        row = snapshot["agents"][agent.agent_id]
        assert row["online"] is True and row["hour"] == 5 and row["minute"] == 5 and row["failed"] == 0
        assert snapshot["total"] == 5 and snapshot["online"] == 1
        await _send(hub, link, agent, "adt", 3, start=5)
        assert (await admin.first_event())["agents"][agent.agent_id]["hour"] == 8  # the count rises
    assert (await admin.page("/dashboard/?status=online")).count('data-agent="') == 0
    assert (await admin.page("/dashboard/?status=offline")).count('data-agent="') == 1
    assert (await admin.page("/dashboard/?name=LA")).count('data-agent="') == 1
    assert (await admin.page("/dashboard/?name=zzz")).count('data-agent="') == 0


async def test_agent_page_channels_stats_and_operations(hub: HubServer, agent: AgentCredentials,
                                                        admin: DashboardClient) -> None:
    handler = RuntimeLikeHandler()
    async with running_link(hub, agent, handler) as link:
        await _send(hub, link, agent, "adt", 4)
        page = await admin.page(f"/dashboard/agents/{agent.agent_id}")
        for text in ("adt", "broken", "mllp://0.0.0.0:2575", 'id="op-upgrade" disabled', 'data-chart="rate"', 'data-chart="ack"'):
            assert text in page
        snapshot = await admin.first_event(f"/dashboard/events?agent={agent.agent_id}")
        assert snapshot["agent"]["online"] is True
        adt = snapshot["channels"]["adt"]
        assert sum(adt["perMinute"]) == 4 and adt["lastMinute"] == 4 and adt["p50"] is not None
        stats = snapshot["stats"]
        assert stats["implementation"] == "cython" and stats["queueDepth"] == 3 and stats["rttMs"] == 1.5
        assert stats["oldestUnconfirmedS"] == 2.0
        assert stats["channels"]["adt"]["ackP50"] == "≤ 0.5 ms" and stats["channels"]["adt"]["ackP99"] == "≤ 5 ms"
        assert snapshot["ackHistory"] == []  # the first $stats sample is the baseline
        later = await admin.events(f"/dashboard/events?agent={agent.agent_id}", lambda s: bool(s["ackHistory"]))
        assert [point[1:] for point in later["ackHistory"]] == [[0.5, 5.0]]  # the interval's ACKs

        reload_ok = await admin.post(f"/dashboard/agents/{agent.agent_id}/reload")
        assert reload_ok.status == 200 and "Reload done" in await reload_ok.text()
        handler.reload_error = "reload failed: Endpoint adt has no address"
        reload_bad = await admin.post(f"/dashboard/agents/{agent.agent_id}/reload")
        assert reload_bad.status == 502 and "Endpoint adt has no address" in await reload_bad.text()
        logs = await admin.post(f"/dashboard/agents/{agent.agent_id}/logs", {"limit": "3"})
        assert logs.status == 200 and "Fetched 3 log lines" in await logs.text()
        push = await admin.post(f"/dashboard/agents/{agent.agent_id}/push", {
            "destination": "mllp://10.9.9.9:2575", "contentType": "x-application/hl7-v2+er7",
            "body": "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|T1|T|2.5.1\nEVN|A01"})
        assert push.status == 200 and "MSA|AA|PUSHED" in await push.text()
        pushed = [r for r in handler.requests if type(r).__name__ == "TransmitRequest"][-1]
        assert pushed.body.endswith("\rEVN|A01") and pushed.remote == "mllp://10.9.9.9:2575"  # type: ignore[attr-defined]
        upgrade = await admin.post(f"/dashboard/agents/{agent.agent_id}/upgrade")
        assert upgrade.status == 409
    offline = await admin.post(f"/dashboard/agents/{agent.agent_id}/logs", {"limit": "3"})
    assert offline.status == 502 and "Agent not connected" in await offline.text()
    assert (await admin.get("/dashboard/agents/no-such-agent")).status == 404
    assert (await admin.get("/dashboard/events?agent=no-such-agent")).status == 404
    audit = await admin.page("/dashboard/audit")
    for action in ("reload", "logs", "push", "upgrade"):
        assert f"<td>{action}</td>" in audit


async def test_messages_search_detail_body_on_click_and_audited(hub: HubServer, agent: AgentCredentials,
                                                                admin: DashboardClient) -> None:
    async with running_link(hub, agent, RuntimeLikeHandler()) as link:
        await _send(hub, link, agent, "adt", 60)
        await _send(hub, link, agent, "broken", 2, start=100)
    page = await admin.page("/dashboard/messages")
    ids = [int(i) for i in re.findall(r'<a href="/dashboard/messages/(\d+)">', page)]
    assert len(ids) == 50 and ids == sorted(ids, reverse=True)  # newest first, one page
    assert "Older messages" in page
    older = re.search(r'href="(/dashboard/messages\?before=\d+)"', page)
    assert older is not None
    rest = await admin.page(older.group(1).replace("&amp;", "&"))
    assert len(re.findall(r'<a href="/dashboard/messages/(\d+)">', rest)) == 12
    failed = await admin.page("/dashboard/messages?agent=lab&status=error")
    assert len(re.findall(r'<a href="/dashboard/messages/\d+">', failed)) == 2
    by_control = await admin.page("/dashboard/messages?control_id=MSG00007&type=ADT")
    assert len(re.findall(r'<a href="/dashboard/messages/\d+">', by_control)) == 1
    assert "SECRET-MRN" not in page + failed + by_control  # no bodies in lists
    bad = await admin.get("/dashboard/messages?since=yesterday")
    assert bad.status == 400 and "since must be" in await bad.text()

    message_id = (await _stored(hub, control_id="MSG00007"))[0].id
    detail = await admin.page(f"/dashboard/messages/{message_id}")
    assert "MSG00007" in detail and "ADT^A01^ADT_A01" in detail and "processed" in detail
    assert "SECRET-MRN" not in detail and 'id="show-body"' in detail
    shown = await admin.post(f"/dashboard/messages/{message_id}/body")
    text = await shown.text()
    assert shown.status == 200 and "SECRET-MRN-7" in text and "MSA|AA|MSG00007" in text
    db = DashboardDB(hub.data_dir)
    try:
        assert ("view-body", f"message {message_id}") in [(e.action, e.target) for e in db.audit_entries()]
    finally:
        db.close()
    assert (await admin.get("/dashboard/messages/999999")).status == 404


async def test_retry_runs_the_bot_again_through_the_hub_dispatcher(hub: HubServer, agent: AgentCredentials,
                                                                   admin: DashboardClient) -> None:
    async with running_link(hub, agent, RuntimeLikeHandler()) as link:
        await _send(hub, link, agent, "broken", 1)
        await _send(hub, link, agent, "adt", 1)
    failed = await _stored(hub, status=MessageStatus.ERROR)
    assert len(failed) == 1 and "dashboard_no_such_module" in (failed[0].error or "")
    target = failed[0]
    detail = await admin.page(f"/dashboard/messages/{target.id}")
    assert 'id="retry"' in detail
    still_broken = await admin.post(f"/dashboard/messages/{target.id}/retry")
    assert "Retry done: error" in await still_broken.text()
    # the operator fixes the channel's bot, then retries
    channel = next(c for c in await hub.store.list_channels(agent.agent_id) if c.name == "broken")
    await hub.store.update_channel(channel.id, bot=ACK_BOT)
    retried = await admin.post(f"/dashboard/messages/{target.id}/retry")
    assert retried.status == 200 and "Retry done: processed" in await retried.text()
    after = await hub.store.get_message(target.callback)
    assert after.status is MessageStatus.PROCESSED and after.reply_body and "MSA|AA|" in after.reply_body
    assert after.id == target.id and len(await _stored(hub)) == 2  # same row, nothing added
    assert hub.context.dispatcher.backlog(agent.agent_id).count == 0  # backpressure accounting intact
    processed = (await _stored(hub, status=MessageStatus.PROCESSED))[0]
    refused = await admin.post(f"/dashboard/messages/{processed.id}/retry")
    assert "only failed messages can be retried" in await refused.text()
    audit = await admin.page("/dashboard/audit")
    assert audit.count("<td>retry</td>") == 3


async def test_names_and_values_are_escaped(hub: HubServer, admin: DashboardClient) -> None:
    evil = '<script>alert("x")</script>'
    credentials = await hub.store.add_agent(evil)
    await hub.store.add_channel(credentials.agent_id, '"><img src=x onerror=alert(1)>', "mllp://0.0.0.0:1")
    for path in ("/dashboard/", f"/dashboard/agents/{credentials.agent_id}", "/dashboard/messages"):
        page = await admin.page(path)
        assert evil not in page and "&lt;script&gt;" in page
        assert "<img src=x" not in page
    assert render("<b>{v}</b>", v=Markup("<i>ok</i>")) == "<b><i>ok</i></b>"
    assert render('<a title="{v}">', v='"') == '<a title="&quot;">'


async def test_static_assets_ship_in_the_package_and_nothing_loads_from_elsewhere(hub: HubServer,
                                                                                admin: DashboardClient) -> None:
    page = await admin.page("/dashboard/")
    for asset in ("dashboard.js", "dashboard.css"):
        assert f"/static/dashboard/{asset}" in page
        response = await admin.get(f"/static/dashboard/{asset}")
        assert response.status == 200
        text = await response.text()
        assert text == (STATIC_DIR / asset).read_text()
        assert not re.search(r"https?://", text), asset  # no CDN, no web fonts
    assert not re.search(r'(src|href)="https?://', page)


async def test_hub_stop_ends_open_event_streams(hub: HubServer, agent: AgentCredentials, admin: DashboardClient) -> None:
    response = await admin.http.get(hub.url + f"/dashboard/events?agent={agent.agent_id}")
    assert response.status == 200
    await response.content.readline()
    async with asyncio.timeout(15):  # shutdown would otherwise wait 60 s for the stream handler
        await hub.stop()
    response.close()


async def test_dicom_series_are_listed_with_their_dicomweb_url(hub: HubServer, admin: DashboardClient) -> None:
    from medagent.dicom.files import InstanceInfo
    from medagent.hub.dicomweb.store import DicomStore

    assert "No DICOM instance stored yet" in await admin.page("/dashboard/dicom")
    store = DicomStore(hub.data_dir)
    store.open()
    try:
        for n in (1, 2):
            info = InstanceInfo(
                study_uid="1.2.826.0.1.3680043.8.498.1", series_uid="1.2.826.0.1.3680043.8.498.1.1",
                sop_uid=f"1.2.826.0.1.3680043.8.498.1.1.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                transfer_syntax="1.2.840.10008.1.2.1", modality="OT", patient_id="PHI-PATIENT-ID",
                patient_name="DOE^PHI", study_date="20240101", study_time="120000", accession_number="A1",
                study_description="", series_description="", series_number=1, instance_number=n,
                number_of_frames=1,
            )
            assert store.add(info, 1024 * 1024, "0" * 64, {})
    finally:
        store.close()
    page = await admin.page("/dashboard/dicom")
    url = f"{hub.url}/dicomweb/studies/1.2.826.0.1.3680043.8.498.1/series/1.2.826.0.1.3680043.8.498.1.1"
    assert f'<a href="{url}">' in page and "<td>OT</td>" in page and '<td class="num">2</td>' in page
    assert "PHI" not in page  # no patient name or id


async def test_logout_ends_the_open_event_streams(hub: HubServer, admin: DashboardClient) -> None:
    import orjson

    from medagent.hub.dashboard.live import SESSION_CHECK_EVERY

    async with admin.http.get(hub.url + "/dashboard/events") as stream:
        assert stream.status == 200
        assert (await stream.content.readline()).startswith(b"event: snapshot")
        assert (await admin.post("/dashboard/logout")).status == 303
        snapshots = 0
        async with asyncio.timeout(SESSION_CHECK_EVERY + 20):
            for _ in range(4 * (SESSION_CHECK_EVERY + 5)):  # bounded: the stream must end first
                line = await stream.content.readline()
                if not line:
                    break
                snapshots += line.startswith(b"data: ")
                if line.startswith(b"data: "):
                    orjson.loads(line[6:])
        assert line == b"" and snapshots <= SESSION_CHECK_EVERY  # the server closed the stream
