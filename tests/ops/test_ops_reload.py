"""$reload-config over the hub: added, changed, removed and bad channels while a sender keeps
sending on an unchanged channel; nothing it sent is lost or duplicated."""

from __future__ import annotations

import asyncio

from opstest import OpsSite, Sender, assert_nothing_lost, http, send_messages


async def _reload(site: OpsSite) -> tuple[int, str]:
    return await http(site.hub, "POST", f"/fhir/R4/Agent/{site.credentials.agent_id}/$reload-config")


async def test_reload_diff_with_a_sender_running(site: OpsSite) -> None:
    sender = Sender(site.port)
    try:
        store, agent_id = site.hub.store, site.credentials.agent_id
        added = await store.add_channel(agent_id, "lab-in", "mllp://127.0.0.1:0?ackMode=fast")
        status, text = await _reload(site)
        assert status == 200, text
        lab = site.runtime.channels["lab-in"]
        lab_port = lab.port  # type: ignore[attr-defined]
        [ack] = await send_messages(lab_port, ["LAB1"])
        assert b"MSA|AA|LAB1" in ack

        await store.update_channel(added.id, address="mllp://127.0.0.1:0?ackMode=two-phase")
        status, text = await _reload(site)
        assert status == 200, text
        assert site.runtime.channels["lab-in"] is not lab  # restarted with the new options ...
        assert site.runtime.channels["lab-in"].port == lab_port  # type: ignore[attr-defined]  # ... on the same socket

        bad = await store.add_channel(agent_id, "bad-in", "mllp://127.0.0.1:0?noSuchParameter=1")
        status, text = await _reload(site)
        assert status == 400 and "bad-in" in text and "noSuchParameter" in text
        assert "lab-in" in site.runtime.channels and "bad-in" not in site.runtime.channels
        await store.remove_channel(bad.id)

        await store.remove_channel(added.id)
        status, text = await _reload(site)
        assert status == 200, text
        assert "lab-in" not in site.runtime.channels
        assert site.runtime.channels[site.channel].port == site.port  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)  # a few more sends after the last reload
    finally:
        await sender.stop()
    assert len(sender.acked) > 0
    await assert_nothing_lost(site, sender)
