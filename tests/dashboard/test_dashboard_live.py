"""The pure parts of the live figures: reading an agent's $stats, histogram percentiles, ranks."""

from __future__ import annotations

from medagent.hub.dashboard.live import (
    ack_point,
    histogram_percentile,
    queue_depth,
    summarize_stats,
)
from medagent.hub.dashboard.markup import age
from medagent.hub.dashboard.queries import percentile


def test_queue_depth_from_the_runtime_counters_and_from_a_store_snapshot() -> None:
    runtime = {"submitted_waiting": 1, "ready_in_memory": 5, "backlog_on_disk": 10, "inflight": 4,
               "store": {"pending": 99, "channels": {"a": {"pending": 7, "oldest_pending_age_s": 3.25},
                                                     "b": {"pending": 1, "oldest_pending_age_s": 9.0}}}}
    assert queue_depth(runtime) == (20, 9.0)
    assert queue_depth({**runtime, "submitted_waiting": 0, "ready_in_memory": 0, "backlog_on_disk": 0,
                        "inflight": 0}) == (0, None)  # nothing waiting: no age, whatever the old sweep said
    assert queue_depth({"pending": 3, "channels": {"a": {"pending": 3, "oldest_pending_age_s": 2.0}}}) == (3, 2.0)
    assert queue_depth({}) == (None, None)


def test_histogram_percentiles_name_the_bucket_bound() -> None:
    histogram = {"+Inf": 1, "0.5": 90, "1": 8, "5": 1}
    assert histogram_percentile(histogram, 0.5) == "≤ 0.5 ms"
    assert histogram_percentile(histogram, 0.99) == "≤ 5 ms"
    assert histogram_percentile(histogram, 1.0) == "> 5000 ms"
    assert histogram_percentile({}, 0.5) is None


def test_summary_tolerates_a_sparse_stats_object() -> None:
    summary = summarize_stats({"implementation": "pure", "link": {"last_ping_ms": 1.23456}})
    assert summary["implementation"] == "pure" and summary["rttMs"] == 1.23 and summary["queueDepth"] is None
    assert summary["channels"] == {}


def test_nearest_rank_percentile_and_ages() -> None:
    assert percentile([], 0.5) is None
    assert percentile([5], 0.99) == 5
    values = list(range(1, 101))
    assert percentile(values, 0.5) == 50 and percentile(values, 0.99) == 99 and percentile(values, 1.0) == 100
    assert [age(None), age(4.9), age(61), age(7200), age(90000)] == ["—", "4 s", "1 min", "2 h", "1 d"]


def test_ack_points_are_the_percentiles_of_each_interval() -> None:
    previous: dict[str, dict[str, int]] = {}
    first = {"adt": {"latencyMs": {"0.5": 100, "2": 0}}, "lab": {"latencyMs": {"1": 10}}}
    assert ack_point(previous, first) == (1.0, 1.0)  # the worst channel (lab: 1 ms)
    assert ack_point(previous, first) == (None, None)  # nothing answered since
    later = {"adt": {"latencyMs": {"0.5": 100, "2": 50, "+Inf": 1}}, "lab": {"latencyMs": {"1": 10}}}
    assert ack_point(previous, later) == (2.0, 10_000.0)  # only the 51 new answers count
    restarted = {"adt": {"latencyMs": {"0.5": 3}}, "lab": {"latencyMs": {"1": 0}}}
    assert ack_point(previous, restarted) == (0.5, 0.5)  # counters went down: the agent restarted
