"""Stats: Medplum's shape and ours, changing as messages flow (agent + hub on 127.0.0.1)."""

from __future__ import annotations

import json

import orjson
from opstest import OpsSite, http, send_messages, until

from medagent.ops.stats import PENDING_TTL_S, RateMeter, RttTracker, rtt_summary

RTT_KEYS = {"count", "min", "max", "average", "p50", "p95", "p99", "pendingCount"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rtt_summary_is_medplums_shape_with_minus_one_when_empty() -> None:
    assert rtt_summary([], 3) == {"count": 0, "min": -1, "max": -1, "average": -1, "p50": -1, "p95": -1,
                                  "p99": -1, "pendingCount": 3}
    summary = rtt_summary([float(v) for v in range(1, 101)], 0)
    assert (summary["count"], summary["min"], summary["max"], summary["average"]) == (100, 1.0, 100.0, 50.5)
    assert (summary["p50"], summary["p95"], summary["p99"]) == (50.0, 95.0, 99.0)


def test_rtt_tracker_pairs_sends_with_answers_and_forgets_old_pending() -> None:
    clock = Clock()
    tracker = RttTracker(clock)
    tracker.sent("cb1", "adt")
    tracker.sent("cb2", "adt")
    clock.now += 0.004
    tracker.answered("cb1")
    tracker.answered("unknown")  # not ours: ignored
    summary = tracker.summary("adt")
    assert summary["count"] == 1 and abs(summary["max"] - 4.0) < 1e-6 and summary["pendingCount"] == 1
    clock.now += PENDING_TTL_S + 1
    tracker.sent("cb3", "lab")  # a send expires pending entries older than Medplum's 5 minutes
    assert tracker.summary("adt")["pendingCount"] == 0
    tracker.answered("cb2")  # too late: forgotten, no sample
    assert tracker.summary("adt")["count"] == 1


def test_a_confirmation_batch_ends_its_round_trips_and_the_proxies_forward_the_link() -> None:
    clock = Clock()
    tracker = RttTracker(clock)

    class Link:
        def __init__(self) -> None:
            self.live, self.features, self.sent = True, frozenset({"batch"}), []

        def send_transmit(self, message: object) -> bool:
            self.sent.append(message)
            return self.live

    class Message:
        def __init__(self, callback: str) -> None:
            self.callback, self.channel = callback, "adt"

    class Handler:
        def __init__(self) -> None:
            self.confirmed: list[str] = []

        def on_confirmed(self, callbacks: list[str]) -> None:
            self.confirmed.extend(callbacks)

    link, handler = Link(), Handler()
    tracked_link, tracked_handler = tracker.wrap_link(link), tracker.wrap_handler(handler)
    assert tracked_link.live is True and tracked_link.features == {"batch"}
    assert tracked_link.send_transmit(Message("cb1")) and tracked_link.send_transmit(Message("cb2"))
    link.live = False
    assert not tracked_link.send_transmit(Message("cb3")) and tracked_link.live is False  # refused: not pending
    assert tracker.summary("adt")["pendingCount"] == 2
    clock.now += 0.002
    tracked_handler.on_confirmed(["cb1", "cb2", "cb3", "unknown"])
    assert handler.confirmed == ["cb1", "cb2", "cb3", "unknown"]
    summary = tracker.summary("adt")
    assert summary["count"] == 2 and summary["pendingCount"] == 0 and abs(summary["max"] - 2.0) < 1e-6


def test_rate_meter_windows_and_counter_restart() -> None:
    clock = Clock()
    meter = RateMeter(interval_s=5.0, clock=clock)
    for step in range(25):  # 120 s of samples at 10 units/s
        meter.sample({"a": step * 50.0})
        clock.now += 5.0
    rates = meter.rates({"a": 25 * 50.0})
    assert rates["a"]["1m"] == 10.0 and rates["a"]["5m"] == 10.0 and rates["a"]["15m"] == 10.0
    # the counter went down (a channel restarted): no negative rate
    assert meter.rates({"a": 3.0})["a"]["1m"] == 0.0
    # a counter that appeared since (a channel added by a reload) counted from 0 in older samples
    assert meter.rates({"new": 60.0})["new"]["1m"] == 1.0


async def test_stats_over_the_hub_change_as_messages_flow(site: OpsSite) -> None:
    path = f"/fhir/R4/Agent/{site.credentials.agent_id}/$stats"
    status, text = await http(site.hub, "GET", path)
    assert status == 200, text
    before = json.loads(orjson.loads(text)["parameter"][0]["valueString"])
    channel = before["channelStats"][site.channel]
    assert set(channel["rtt"]) == RTT_KEYS and channel["rtt"]["count"] == 0
    for key in ("hl7ConnectionsOpen", "live", "outstandingHeartbeats", "durableQueue", "clientStats",
                "webSocketQueueDepth", "hl7QueueDepth", "version", "python", "kernels", "eventLoop",
                "uptimeSeconds", "dataDir", "queueDepth"):
        assert key in before, key
    assert before["live"] is True and before["kernels"] in ("cython", "pure")
    assert before["dataDir"]["usedBytes"] > 0

    acks = await send_messages(site.port, [f"S{i}" for i in range(20)])
    assert all(b"MSA|AA|" in ack for ack in acks)
    await until(lambda: site.runtime.ops.rtt.summary(site.channel)["count"] == 20, "20 round trips")
    await until(lambda: site.runtime.ops.stats()["channelStats"][site.channel]["rates"]["unitsIn"]["1m"] > 0,
                "a positive intake rate")

    status, text = await http(site.hub, "GET", path)
    after = json.loads(orjson.loads(text)["parameter"][0]["valueString"])
    channel = after["channelStats"][site.channel]
    assert channel["unitsIn"] - before["channelStats"][site.channel]["unitsIn"] == 20
    assert channel["answers"].get("AA", 0) >= 20
    assert channel["rtt"]["count"] == 20 and 0 <= channel["rtt"]["min"] <= channel["rtt"]["p50"] <= channel["rtt"]["max"]
    assert channel["rates"]["unitsIn"]["1m"] > 0
    assert after["queueDepth"] == 0 and after["hl7QueueDepth"] == 0
    assert "PHI" not in text and "ZEBRAFINCH" not in text  # no body in stats
