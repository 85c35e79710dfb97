"""Benchmarks of medagent as a whole: the `medagent bench` end-to-end load tool.

* `medagent.bench.loadgen` — lock-step MLLP load generator (N connections, one message in flight
  on each, every ACK checked), runnable in this event loop or split over worker processes.
* `medagent.bench.harness` — starts the system under test (`medagent serve`, or the independent
  C echo-ACK server that gives the machine's ceiling) as separate processes, runs a load against
  it, samples its CPU and stops it.
* `medagent.bench.report` — the results as a text table or one JSON document.
* `medagent.bench.cli` — the `medagent bench` command.

The kernel micro-benchmarks (pure twins against Cython twins) live in the repository's
``benchmarks/`` directory and run under pytest-benchmark. See docs/benchmarks.md.
"""

from __future__ import annotations

from medagent.bench.loadgen import LatencyHistogram, LoadResult, LoadSpec, run_load, run_senders

__all__ = ["LatencyHistogram", "LoadResult", "LoadSpec", "run_load", "run_senders"]
