"""`medagent bench soak` against a real `medagent serve` (agent + embedded hub) on 127.0.0.1:
the windows tile the measured time, every window has a footprint sample, the summary is built
from them. Counts and shapes only, no timing assertions.
"""

from __future__ import annotations

import argparse
import os

import pytest

from medagent.bench import cli as bench_cli
from medagent.bench.soak import SoakReport, SoakSpec, SoakWindow, format_summary, run_soak


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_short_soak_reports_every_window() -> None:
    seen: list[SoakWindow] = []
    report = run_soak(SoakSpec(duration_s=3.0, window_s=1.0, warmup_s=0.5, conns=2, retention_max_mb=1),
                      seen.append)
    assert [w.index for w in report.windows] == [1, 2, 3] and seen == report.windows
    assert abs(sum(w.seconds for w in report.windows) - 3.0) < 1e-6  # windows tile the schedule
    assert report.errors == 0 and report.messages > 0
    for window in report.windows:
        assert window.agent_rss_mb and window.hub_rss_mb and window.agent_fds and window.hub_fds
        assert window.agent_disk_mb > 0 and window.hub_disk_mb > 0
    summary = format_summary(report)
    assert "sustained" in summary and "longest stall" in summary


def window(index: int, messages: int, stall: float, rss: float) -> SoakWindow:
    return SoakWindow(index, 10.0 * index, 10.0, messages, stall, rss, 2 * rss, 20, 30, 1.0 * index, 2.0 * index)


def test_summary_figures() -> None:
    report = SoakReport("fast", 10, "c", 10.0, [window(1, 1000, 5.0, 50.0), window(2, 800, 250.0, 55.0)])
    figures = report.to_dict()
    assert figures["burst_rate"] == 100.0 and figures["sustained_rate"] == 90.0
    assert figures["sustained_vs_burst"] == 0.9
    assert figures["longest_stall_ms"] == 250.0 and figures["longest_stall_window"] == 2
    assert figures["agent_rss_growth"] == 0.1
    assert figures["agent_bytes_per_msg"] == round(2.0 * 1e6 / 1800)


@pytest.mark.parametrize("argv", [("--duration", "0"), ("--conns", "0"), ("--retention-max-mb", "0")])
def test_usage_errors_exit_2(argv: tuple[str, ...]) -> None:
    parser = argparse.ArgumentParser(prog="medagent")
    bench_cli.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "soak", *argv])
    assert args.handler(args) == 2
