"""The agent<->hub link benchmark (benchmarks/link_roundtrip.py) under pytest-benchmark, short.

Each case starts a fresh ``medagent hub serve`` process, connects the real ``AgentLink`` (uvloop)
with ``use_batching`` on or off, runs one load shape for a short time and stores the whole result
(msg/s, RTT and confirmation p50/p99, CPU, frame counters) in ``extra_info``. The benchmark's own
time is the scenario's wall time (pedantic, one round), so read ``extra_info``. Not part of CI.
The hub uses the Cython kernels unless MEDAGENT_NO_EXTENSIONS is set for the run.

Knobs: MEDAGENT_LINK_BENCH_DURATION (s, default 1), MEDAGENT_LINK_BENCH_FLOOD (messages,
default 5000). Full matrix and tables: ``python benchmarks/link_roundtrip.py``.

Run: ``pytest benchmarks/test_link.py --benchmark-columns=rounds --benchmark-json out.json``
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from link_roundtrip import Impl, RunLimits, Scenario, Shape, run_scenario

from medagent import _compat

DURATION_S = float(os.environ.get("MEDAGENT_LINK_BENCH_DURATION", "1"))
FLOOD_MESSAGES = int(os.environ.get("MEDAGENT_LINK_BENCH_FLOOD", "5000"))
LIMITS = RunLimits(duration_s=DURATION_S, warmup_s=0.5, max_messages=1_000_000, flood_timeout_s=60)
HUB_IMPL = Impl.PY if _compat.NO_EXTENSIONS else Impl.C


def _record(benchmark: Any, scenario: Scenario) -> None:
    result = benchmark.pedantic(run_scenario, args=(scenario, LIMITS), rounds=1, iterations=1)
    benchmark.extra_info.update(result.to_dict())
    assert result.error is None, result.error
    assert result.errors == 0, result.to_dict()
    assert result.messages > 0


@pytest.mark.parametrize("batching", [True, False], ids=["batch", "plain"])
@pytest.mark.parametrize("window", [1, 10, 100])
def test_window(benchmark: Any, window: int, batching: bool) -> None:
    _record(benchmark, Scenario(Shape.WINDOW, window, batching, HUB_IMPL))


@pytest.mark.parametrize("batching", [True, False], ids=["batch", "plain"])
def test_flood(benchmark: Any, batching: bool) -> None:
    _record(benchmark, Scenario(Shape.FLOOD, FLOOD_MESSAGES, batching, HUB_IMPL))
