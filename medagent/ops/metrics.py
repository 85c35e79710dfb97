"""Prometheus exposition of the agent's and the hub's figures (text format 0.0.4).

Theory of operation
-------------------
Nothing is counted twice: the agent's stats document (:mod:`medagent.ops.stats`) is the one
source, and :class:`StatsCollector` translates a fresh document into metric families on every
scrape (prometheus-client's custom-collector pattern), so ``GET /metrics`` and ``$stats`` can
never disagree. Counters are the channels' cumulative counters; the ACK latency histogram is
the channels' bucket counts made cumulative; round trips are a summary with Medplum's
quantiles.

:class:`MetricsServer` serves ``GET /metrics`` on a local port (``[agent] metrics_port``;
default host 127.0.0.1, so a scraper on another machine needs an explicit host). The hub's own
``/metrics`` is served on the hub's port (see medagent.hub.operations) from
:func:`hub_families`.

Invariants: label values are channel names, kinds, answer codes and versions, never message
content; a collector error answers 500 with the error's type, it never stops the agent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

__all__ = ["MetricsServer", "StatsCollector", "hub_families", "render"]

log = logging.getLogger("medagent.metrics")

_CHANNEL_COUNTERS = (
    ("unitsIn", "medagent_channel_units_in", "Units (messages, instances, transmissions) accepted"),
    ("unitsOut", "medagent_channel_units_out", "Units sent out (replies and outbound sends)"),
    ("bytesIn", "medagent_channel_bytes_in", "Bytes received on the channel's connections"),
    ("bytesOut", "medagent_channel_bytes_out", "Bytes sent on the channel's connections"),
    ("errors", "medagent_channel_errors", "Framing, decoding and connection errors"),
)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class StatsCollector(Collector):
    """Metric families from ``source()``, the agent's current stats document."""

    def __init__(self, source: Callable[[], Mapping[str, Any]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        stats = self._source()
        yield from _agent_families(stats)
        yield from _channel_families(stats.get("channelStats") or {})


def _agent_families(stats: Mapping[str, Any]) -> Iterable[Metric]:
    info = InfoMetricFamily("medagent_build", "Version, Python, kernels and event loop")
    info.add_metric([], {"version": str(stats.get("version", "")), "python": str(stats.get("python", "")),
                         "kernels": str(stats.get("kernels", "")), "event_loop": str(stats.get("eventLoop", ""))})
    yield info
    gauges = (
        ("medagent_up_seconds", "Seconds since the agent started", stats.get("uptimeSeconds")),
        ("medagent_link_live", "1 when the link to the hub is connected and authenticated", 1 if stats.get("live") else 0),
        ("medagent_link_ping_ms", "Last heartbeat round trip to the hub (ms)", stats.get("ping")),
        ("medagent_link_outstanding_heartbeats", "Heartbeats sent without an answer", stats.get("outstandingHeartbeats")),
        ("medagent_queue_depth", "Messages accepted and not yet confirmed by the hub", stats.get("queueDepth")),
        ("medagent_queue_oldest_unconfirmed_seconds", "Age of the oldest unconfirmed message",
         stats.get("oldestUnconfirmedAgeSeconds") or 0),
        ("medagent_hl7_connections_open", "Open HL7 (MLLP) connections", stats.get("hl7ConnectionsOpen")),
    )
    for name, text, value in gauges:
        number = _number(value)
        if number is not None:
            yield GaugeMetricFamily(name, text, value=number)
    disk = stats.get("dataDir") or {}
    for key, name, text in (("usedBytes", "medagent_data_dir_used_bytes", "Bytes stored in the data directory"),
                            ("freeBytes", "medagent_data_dir_free_bytes", "Free bytes on the data directory's file system")):
        number = _number(disk.get(key))
        if number is not None:
            yield GaugeMetricFamily(name, text, value=number)
    queue = stats.get("durableQueue") or {}
    for key, name, text in (("committed", "medagent_queue_committed", "Messages committed to the durable queue"),
                            ("confirmed", "medagent_queue_confirmed", "Messages confirmed by the hub"),
                            ("duplicates_flagged", "medagent_queue_duplicates_flagged", "Duplicates delivered with a flag"),
                            ("dedup_lookups_skipped", "medagent_queue_dedup_lookups_skipped",
                             "Duplicate checks the in-memory key filter answered without an SQLite lookup")):
        number = _number(queue.get(key))
        if number is not None:
            yield CounterMetricFamily(name, text, value=number)
    number = _number(queue.get("dedup_filter_bytes"))
    if number is not None:
        yield GaugeMetricFamily("medagent_queue_dedup_filter_bytes", "Memory of the duplicate check's key filter", value=number)


def _channel_families(channels: Mapping[str, Mapping[str, Any]]) -> Iterable[Metric]:
    labels = ["channel", "kind"]
    counters = {key: CounterMetricFamily(name, text, labels=labels) for key, name, text in _CHANNEL_COUNTERS}
    connections = GaugeMetricFamily("medagent_channel_connections_open", "Open connections", labels=labels)
    answers = CounterMetricFamily("medagent_channel_answers", "Answers sent, by code (AA, AE, CA, 0x0000, ...)",
                                  labels=[*labels, "code"])
    latency = HistogramMetricFamily("medagent_channel_ack_latency_ms", "Accept -> answer latency (ms)", labels=labels)
    rtt = SummaryMetricFamily("medagent_channel_rtt_ms", "Link round trip of the last 1000 messages (ms)", labels=labels)
    for name, figures in sorted(channels.items()):
        values = [name, str(figures.get("kind", ""))]
        for key, family in counters.items():
            family.add_metric(values, float(figures.get(key) or 0))
        connections.add_metric(values, float(figures.get("connectionsOpen") or 0))
        for code, count in sorted((figures.get("answers") or {}).items()):
            answers.add_metric([*values, str(code)], float(count))
        buckets = _cumulative(figures.get("latencyMs") or {})
        if buckets:
            latency.add_metric(values, buckets, sum_value=None)
        summary = figures.get("rtt") or {}
        count = int(summary.get("count") or 0)
        if count > 0:
            rtt.add_metric(values, count_value=count, sum_value=float(summary["average"]) * count)
            for quantile, key in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")):
                rtt.samples.append(Sample("medagent_channel_rtt_ms",
                                          {"channel": name, "kind": values[1], "quantile": quantile}, float(summary[key])))
    yield from counters.values()
    yield connections
    yield answers
    yield latency
    yield rtt


def _bound(key: str) -> float:
    return float("inf") if key == "+Inf" else float(key)


def _cumulative(histogram: Mapping[str, int]) -> list[tuple[str, float]]:
    """Per-bucket counts -> Prometheus's cumulative ``le`` buckets ending with +Inf."""
    if not histogram:
        return []
    total = 0.0
    out = []
    for key in sorted(histogram, key=_bound):
        total += histogram[key]
        out.append(("+Inf" if _bound(key) == float("inf") else f"{_bound(key):g}", total))
    if out[-1][0] != "+Inf":
        out.append(("+Inf", total))
    return out


def render(*collectors: Collector) -> bytes:
    """The text exposition of ``collectors`` (a fresh registry per scrape: nothing is kept)."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry)


def metrics_response(*collectors: Collector) -> web.Response:
    try:
        body = render(*collectors)
    except Exception as exc:  # noqa: BLE001 - a scrape must never take the process down
        log.warning("metrics collection failed: %s", type(exc).__name__)
        return web.Response(status=500, text=f"metrics collection failed: {type(exc).__name__}\n")
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _FamiliesCollector(Collector):
    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return list(self._families())


def hub_families(connected: int, agents_by_status: Mapping[str, int], versions: Mapping[str, int]) -> Collector:
    """The hub's families: connected agents, agents by status, connected agents by version."""

    def families() -> Iterable[Metric]:
        yield GaugeMetricFamily("medagent_hub_agents_connected", "Agents with an open websocket", value=connected)
        by_status = GaugeMetricFamily("medagent_hub_agents", "Agents by status", labels=["status"])
        for status, count in sorted(agents_by_status.items()):
            by_status.add_metric([status], count)
        yield by_status
        by_version = GaugeMetricFamily("medagent_hub_agent_versions", "Connected agents by reported version",
                                       labels=["version"])
        for version, count in sorted(versions.items()):
            by_version.add_metric([version], count)
        yield by_version

    return _FamiliesCollector(families)


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0: any free port, read back from ``port``)."""

    def __init__(self, source: Callable[[], Mapping[str, Any]], port: int, host: str = "127.0.0.1") -> None:
        self._collector = StatsCollector(source)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                self.port = int(address[1])
                break
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def _handle(self, request: web.Request) -> web.Response:
        return metrics_response(self._collector)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
