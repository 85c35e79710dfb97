"""End-to-end benchmark under pytest-benchmark: a small matrix through `medagent.bench.harness`.

Each case starts the system under test in separate processes (``medagent serve`` with its
embedded hub, or the C echo-ACK server), drives it with lock-step MLLP senders for a few
seconds and stores the whole result (msg/s, latency percentiles, errors, CPU) in
``extra_info``; the benchmark's own time is just the scenario's wall time (pedantic, one
round). Not part of CI. For the full matrix and tables use ``medagent bench``.

Environment knobs: MEDAGENT_BENCH_DURATION (s, default 3), MEDAGENT_BENCH_WARMUP (s, default 1),
MEDAGENT_BENCH_C_SERVER / MEDAGENT_BENCH_C_CLIENT (default /tmp/mllp_server, /tmp/mllp_client).

Run: ``pytest benchmarks/test_e2e.py --benchmark-columns=rounds`` and read extra_info with
``--benchmark-json out.json``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from medagent import _compat
from medagent.bench.harness import SystemStartError, run_scenario

DURATION_S = float(os.environ.get("MEDAGENT_BENCH_DURATION", "3"))
WARMUP_S = float(os.environ.get("MEDAGENT_BENCH_WARMUP", "1"))
C_SERVER = Path(os.environ.get("MEDAGENT_BENCH_C_SERVER", "/tmp/mllp_server"))
C_CLIENT = Path(os.environ.get("MEDAGENT_BENCH_C_CLIENT", "/tmp/mllp_client"))


def _serve_available() -> bool:
    done = subprocess.run([sys.executable, "-m", "medagent", "serve", "--help"], capture_output=True, timeout=60)
    return done.returncode == 0


needs_serve = pytest.mark.skipif(not _serve_available(), reason="`medagent serve --help` does not work yet")


def _record(benchmark: Any, **scenario: Any) -> None:
    def measure() -> Any:
        try:
            return run_scenario(duration=DURATION_S, warmup=WARMUP_S, c_server=C_SERVER,
                                c_client=C_CLIENT, **scenario)
        except SystemStartError as exc:
            pytest.fail(str(exc))

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(result.to_dict())
    assert result.load.errors == 0, result.to_dict()
    assert result.load.messages > 0


@pytest.mark.skipif(not C_SERVER.is_file(), reason=f"C echo server not built at {C_SERVER}")
@pytest.mark.parametrize("conns", [1, 10])
def test_c_echo_ceiling(benchmark: Any, conns: int) -> None:
    _record(benchmark, mode="fast", conns=conns, impl="c", target="c-echo")


@needs_serve
@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("mode,conns", [("fast", 10), ("immediate", 10), ("original", 10), ("two-phase", 10)])
def test_medagent(benchmark: Any, mode: str, conns: int, impl: str) -> None:
    if impl == "c" and _compat.NO_EXTENSIONS:
        pytest.skip("pure mode (MEDAGENT_NO_EXTENSIONS) in force")
    _record(benchmark, mode=mode, conns=conns, impl=impl)


@needs_serve
@pytest.mark.skipif(not C_CLIENT.is_file(), reason=f"C client not built at {C_CLIENT}")
def test_medagent_fast_with_c_client(benchmark: Any) -> None:
    _record(benchmark, mode="fast", conns=10, impl="c", client="c")
