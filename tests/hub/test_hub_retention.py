"""Issue 18 defect 7: hub retention (age and size, bodies before rows, per channel) and the
free-space watermark, against a real HubServer on each store engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hubtest import SpecAgent, adt, hub_settings, transmit

from medagent.hub import AgentCredentials, HubServer, MessageQuery
from medagent.hub.records import IncomingMessage, RetentionPolicy
from medagent.hub.store import HubStore, now_ms
from medagent.storage.space import FreeSpaceWatermark

DAY_MS = 86_400_000


async def put(store: HubStore, channel: str, age_days: float, callback: str, body: str = "x" * 1500) -> None:
    received = now_ms() - int(age_days * DAY_MS)
    await store.store_incoming([IncomingMessage("agent-1", channel, "10.0.0.1:1", callback, "text/plain", body, received)])


async def body_of(store: HubStore, callback: str) -> str | None:
    """The stored body, or None when the row is gone."""
    rows = (await store.query_messages(MessageQuery(control_id=None, include_body=True, limit=1000))).messages
    found = [m for m in rows if m.callback == callback]
    return found[0].body if found else None


@pytest.fixture
async def retention_hub(tmp_path: Path, store_url: str | None) -> AsyncIterator[HubServer]:
    settings = hub_settings(
        tmp_path, store=store_url, retention=RetentionPolicy(max_age_s=10 * 86400, body_max_age_s=2 * 86400),
        retention_channels={"keep": RetentionPolicy(max_age_s=None, body_max_age_s=None),
                            "short": RetentionPolicy(max_age_s=86400, body_max_age_s=3600)},
        retention_interval_s=3600, retention_batch_rows=7)
    server = HubServer(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_age_retention_deletes_expired_rows_and_purges_older_bodies_per_channel(retention_hub: HubServer) -> None:
    store = retention_hub.store
    for i in range(20):  # more than a batch (7) of each kind, so the steps repeat
        await put(store, "adt", 11, f"adt-old-{i}")
        await put(store, "adt", 3, f"adt-mid-{i}")
    await put(store, "adt", 0.5, "adt-new")
    await put(store, "keep", 400, "keep-ancient")
    await put(store, "short", 0.5, "short-mid")
    await put(store, "short", 2, "short-old")
    await put(store, "short", 0.01, "short-new")
    stats = await retention_hub.retention.run_pass()
    assert await body_of(store, "adt-old-0") is None and await body_of(store, "adt-old-19") is None  # older than max_age
    assert await body_of(store, "adt-mid-0") == "" and await body_of(store, "adt-mid-19") == ""  # body purged, row kept
    assert await body_of(store, "adt-new") == "x" * 1500
    assert await body_of(store, "keep-ancient") == "x" * 1500  # the channel's own policy: keep forever
    assert (await body_of(store, "short-old"), await body_of(store, "short-mid"), await body_of(store, "short-new")) == (None, "", "x" * 1500)
    record = await store.get_message("adt-mid-3")
    assert record.reply_body is None and record.body_size == 0 and record.channel == "adt"
    assert (stats.messages_deleted, stats.bodies_purged) == (21, 21)
    again = await retention_hub.retention.run_pass()  # idempotent: nothing left to do
    assert (again.messages_deleted, again.bodies_purged) == (21, 21)


async def test_size_budget_deletes_the_oldest_rows_and_their_pages_are_reused(tmp_path: Path,
                                                                             store_url: str | None) -> None:
    settings = hub_settings(tmp_path, store=store_url, retention=RetentionPolicy(None, None), retention_interval_s=3600,
                            retention_max_bytes=1, retention_batch_rows=50)
    async with HubServer(settings) as hub:
        for i in range(300):
            await put(hub.store, "adt", 1 - i / 1000, f"m-{i}")
        size_before = await hub.store.live_bytes()
        hub.retention._max_bytes = size_before // 2  # a budget half of what is stored
        stats = await hub.retention.run_pass()
        assert await hub.store.live_bytes() <= size_before // 2
        assert 100 <= stats.messages_deleted <= 200
        assert await body_of(hub.store, "m-0") is None and await body_of(hub.store, "m-299") == "x" * 1500  # oldest first
        if hub.store.path is not None:  # SQLite: the file's free pages count as room on the disk
            free = await hub.store.free_page_bytes()
            for i in range(50):  # new messages go into the freed pages: the file does not grow
                await put(hub.store, "adt", 0, f"new-{i}")
            assert await hub.store.free_page_bytes() < free
        hub.retention._max_bytes = 1  # below any data: every row goes, oldest first
        stats = await hub.retention.run_pass()
        assert (await hub.store.query_messages(MessageQuery())).messages == ()


async def test_low_disk_holds_intake_without_storing_or_acking_then_resumes(
        hub: HubServer, agent: AgentCredentials) -> None:
    disk = hub.context.dispatcher.disk
    assert disk is not None and disk.check_now() is None
    disk.watermark = FreeSpaceWatermark(2**62, 0.0)  # more than any disk has: the watermark is crossed
    assert disk.check_now() is not None
    client = await SpecAgent.connected(hub, agent)
    await client.send({"type": "agent:batch", "seq": 7, "messages": [transmit("adt", adt("D1"), "disk-1")]})
    notice = await client.recv_type("agent:error")
    # no callback: agents only log it, and do not give the message up
    assert "callback" not in notice or notice["callback"] is None
    assert notice["body"].startswith("Hub storage is nearly full") and "intake paused" in notice["body"]
    await client.send({"type": "agent:heartbeat:request", "callback": "hb-1"})
    seen: list[str] = []
    await client.recv_until(lambda f: seen.append(f["type"]) or f["type"] == "agent:heartbeat:response")
    assert "agent:batch:ack" not in seen and "agent:transmit:response" not in seen  # held, not acked
    assert (await hub.store.query_messages(MessageQuery(agent_id=agent.agent_id))).messages == ()
    assert disk.held == 1
    disk.watermark = FreeSpaceWatermark(0, 0.0)
    assert disk.check_now() is None  # room again: the held group is stored and acknowledged, no resend
    frames, [response] = await client.acked_responses(7, 1)
    assert response["callback"] == "disk-1" and {"type": "agent:batch:ack", "seq": 7} in frames
    assert (await hub.store.get_message("disk-1")).control_id == "D1"
    await client.close()


async def test_bad_retention_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retention_channels\\['x'\\].max_age_s"):
        HubServer(hub_settings(tmp_path, retention_channels={"x": RetentionPolicy(max_age_s=0)}))
    with pytest.raises(ValueError, match="min_free_percent"):
        HubServer(hub_settings(tmp_path, min_free_percent=100))


async def test_a_pass_running_beside_intake_loses_nothing(retention_hub: HubServer, agent: AgentCredentials) -> None:
    store = retention_hub.store
    stamp = now_ms() - 20 * DAY_MS
    for start in range(0, 3000, 500):
        await store.store_incoming([IncomingMessage("agent-1", "adt", "r", f"exp-{i}", "text/plain", "y" * 700, stamp)
                              for i in range(start, start + 500)])
    client = await SpecAgent.connected(retention_hub, agent)
    sweep = asyncio.create_task(retention_hub.retention.run_pass())  # steps of 7 rows: ~430 steps
    for seq in range(1, 6):
        frames = [transmit("adt", adt(f"L{seq}-{i}"), f"live-{seq}-{i}") for i in range(100)]
        await client.send({"type": "agent:batch", "seq": seq, "messages": frames})
    responses = await client.responses(500, timeout=30)
    stats = await asyncio.wait_for(sweep, 60)
    assert {r["callback"] for r in responses} == {f"live-{s}-{i}" for s in range(1, 6) for i in range(100)}
    live = (await store.query_messages(MessageQuery(agent_id=agent.agent_id, limit=1000))).messages
    assert len(live) == 500 and all(m.body_size > 0 for m in live)
    assert stats.messages_deleted == 3000
    assert (await store.query_messages(MessageQuery(agent_id="agent-1"))).messages == ()
    await client.close()
