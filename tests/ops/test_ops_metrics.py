"""GET /metrics on the agent's metrics port and on the hub, parsed with prometheus-client's parser."""

from __future__ import annotations

import aiohttp
from opstest import OpsSite, http, send_messages, until
from prometheus_client.parser import text_string_to_metric_families


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def _scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return await response.text()


async def test_agent_metrics_change_as_messages_flow(site: OpsSite) -> None:
    labels = (("channel", site.channel), ("kind", "mllp"))
    before = _samples(await _scrape(site.metrics_url))
    assert before[("medagent_link_live", ())] == 1.0
    assert ("medagent_build_info", ()) not in before  # info carries labels
    assert any(name == "medagent_build_info" for name, _ in before)
    units_before = before[("medagent_channel_units_in_total", labels)]

    await send_messages(site.port, [f"M{i}" for i in range(7)])
    await until(lambda: site.runtime.ops.rtt.summary(site.channel)["count"] == 7, "7 round trips")
    after = _samples(await _scrape(site.metrics_url))
    assert after[("medagent_channel_units_in_total", labels)] - units_before == 7
    assert after[("medagent_channel_answers_total", tuple(sorted((*labels, ("code", "AA")))))] >= 7
    assert after[("medagent_channel_ack_latency_ms_bucket", tuple(sorted((*labels, ("le", "+Inf")))))] >= 7
    assert after[("medagent_channel_rtt_ms_count", labels)] == 7
    assert ("medagent_channel_rtt_ms", tuple(sorted((*labels, ("quantile", "0.99"))))) in after
    assert after[("medagent_queue_depth", ())] == 0
    # the 7 new control ids were answered "never stored" by the key filter, without SQLite
    assert after[("medagent_queue_dedup_lookups_skipped_total", ())] >= 7
    assert after[("medagent_queue_dedup_filter_bytes", ())] > 0


async def test_hub_metrics_need_the_admin_token_and_count_connected_agents(site: OpsSite) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{site.hub.url}/metrics") as response:
        assert response.status == 401
    status, text = await http(site.hub, "GET", "/metrics")
    assert status == 200
    samples = _samples(text)
    assert samples[("medagent_hub_agents_connected", ())] == 1
    assert samples[("medagent_hub_agents", (("status", "active"),))] == 1
    assert sum(v for (name, _), v in samples.items() if name == "medagent_hub_agent_versions") == 1
