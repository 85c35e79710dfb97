"""Benchmark results as a human table or one JSON document.

Two derived figures make the numbers comparable across machines (DESIGN.md "Performance
targets"):

* ``vs_c_echo``: the scenario's rate divided by the rate of the independent C echo-ACK server
  with the same number of connections, measured in the same run (same client when available,
  else any client). The C server's own rows have 1.0.
* ``vs_py``: for a Cython ("c") row, its rate divided by the pure-Python ("py") row with the
  same mode, connections and client (target: >= 1.5).
* ``vs_medplum``: for a medagent row, its rate divided by the rate of Medplum's own Node stack
  with the same mode (fast = Medplum's fast ACK + forward, nothing persisted; original = the ACK
  from its sink) and connections, measured in the same run.

CPU per message (µs) is the process CPU time over the measured window divided by the messages
acknowledged in it, for the agent side and the hub side separately.

``slow_time_pct`` is the share of the summed ACK latency spent in ACKs of 1 ms or more. A
lock-step sender's rate is 1 / its mean latency, so this is the part of the rate that the rare
slow ACKs cost (at one sender, 3.6 % of the ACKs once held 35 % of the time: benchmarks/perf-log.md).

Invariant: rendering never changes or drops a result; scenarios that failed are listed with
their error text (`Failure`).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medagent.bench.harness import ScenarioResult, Target

__all__ = ["Failure", "Row", "format_markdown", "format_row", "format_table", "machine_info", "rows", "to_document"]


@dataclass(frozen=True, slots=True)
class Failure:
    """A scenario that could not be measured, and why."""

    label: str
    error: str


@dataclass(frozen=True, slots=True)
class Row:
    result: ScenarioResult
    vs_c_echo: float | None
    vs_py: float | None
    vs_medplum: float | None = None


def _c_echo_rate(results: Sequence[ScenarioResult], conns: int, client: str) -> float | None:
    echoes = [r for r in results if r.scenario.target is Target.C_ECHO and r.scenario.conns == conns
              and r.load.rate > 0]
    same_client = [r for r in echoes if r.scenario.client == client]
    chosen = same_client or echoes
    return chosen[0].load.rate if chosen else None


def _py_rate(results: Sequence[ScenarioResult], result: ScenarioResult) -> float | None:
    s = result.scenario
    for other in results:
        o = other.scenario
        if (o.target, o.mode, o.conns, o.client, o.impl) == (s.target, s.mode, s.conns, s.client, "py"):
            return other.load.rate or None
    return None


def _medplum_rate(results: Sequence[ScenarioResult], result: ScenarioResult) -> float | None:
    s = result.scenario
    for other in results:
        o = other.scenario
        if o.target is Target.MEDPLUM and (o.mode, o.conns) == (s.mode, s.conns):
            return other.load.rate or None
    return None


def _ratio(value: float, base: float | None) -> float | None:
    return round(value / base, 3) if base else None


def rows(results: Sequence[ScenarioResult]) -> list[Row]:
    """Every result with its ratios to the C echo server and to pure mode."""
    out = []
    for result in results:
        echo = _c_echo_rate(results, result.scenario.conns, str(result.scenario.client))
        vs_py = _ratio(result.load.rate, _py_rate(results, result)) if result.scenario.impl == "c" else None
        vs_medplum = (_ratio(result.load.rate, _medplum_rate(results, result))
                      if result.scenario.target is Target.MEDAGENT else None)
        out.append(Row(result, _ratio(result.load.rate, echo), vs_py, vs_medplum))
    return out


_COLUMNS = (("target", 8), ("mode", 9), ("conns", 5), ("impl", 4), ("client", 8), ("msg/s", 9),
            ("p50 µs", 8), ("p99 µs", 8), ("p99.9 µs", 9), ("max µs", 9), ("≥1ms time%", 10), ("errors", 6),
            ("client CPU%", 11), ("SUT CPU%", 8), ("agent µs/msg", 12), ("hub µs/msg", 10), ("box CPU%", 8),
            ("vs C echo", 9), ("vs py", 6), ("vs Medplum", 10))


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def format_header() -> str:
    return "  ".join(f"{name:>{width}}" for name, width in _COLUMNS)


def format_row(row: Row) -> str:
    s, load = row.result.scenario, row.result.load
    cells = (str(s.target), s.mode, str(s.conns), s.impl, str(s.client), _number(load.rate),
             _number(load.p50_us), _number(load.p99_us), _number(load.p999_us), _number(load.max_us),
             _number(load.slow_time_pct, 1), str(load.errors), _number(load.cpu_pct), _number(row.result.sut_cpu_pct),
             _number(row.result.agent_us_per_msg, 1), _number(row.result.hub_us_per_msg, 1),
             _number(row.result.machine_cpu_pct),
             _number(row.vs_c_echo, 2), _number(row.vs_py, 2), _number(row.vs_medplum, 2))
    return "  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, _COLUMNS))


def format_table(results: Sequence[ScenarioResult], failures: Iterable[Failure] = (),
                 settings: Mapping[str, Any] | None = None) -> str:
    """The results as a fixed-width text table, then the failures, then the run's settings."""
    lines = [format_header()]
    lines += [format_row(row) for row in rows(results)]
    for failure in failures:
        lines.append(f"FAILED {failure.label}: {failure.error}")
    info = machine_info()
    lines.append(f"machine: {info['cpus']} CPUs, {info['platform']}, Python {info['python']}")
    if settings:
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    lines.append("latencies are per lock-step message (send to full ACK); CPU% is of one core; "
                 "SUT = system under test (agent + embedded hub; Medplum: fastack.mjs + sink.mjs); "
                 "µs/msg = CPU time per acknowledged message; box CPU% = the whole machine "
                 "(every tenant) over the window, of one core; ≥1ms time% = the share of all the "
                 "senders' waiting spent in ACKs of 1 ms or more")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0], "implementation": platform.python_implementation()}


def to_document(results: Sequence[ScenarioResult], failures: Iterable[Failure] = (),
                settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One JSON-serialisable document: machine, settings, results (with ratios), failures."""
    return {
        "machine": machine_info(),
        "settings": dict(settings or {}),
        "results": [{**row.result.to_dict(), "vs_c_echo": row.vs_c_echo, "vs_py": row.vs_py,
                     "vs_medplum": row.vs_medplum}
                    for row in rows(results)],
        "failures": [{"scenario": f.label, "error": f.error} for f in failures],
    }


_MARKDOWN_COLUMNS = (
    ("target", "target", None), ("mode", "mode", None), ("conns", "senders", None), ("impl", "impl", None),
    ("load_rate", "msg/s", 0), ("load_p50_us", "p50 µs", 0), ("load_p99_us", "p99 µs", 0),
    ("load_slow_time_pct", "time in ACKs ≥ 1 ms %", 1),
    ("agent_us_per_msg", "agent CPU µs/msg", 1), ("hub_us_per_msg", "hub CPU µs/msg", 1),
    ("vs_medplum", "vs Medplum", 2), ("vs_c_echo", "vs C echo", 3), ("vs_py", "vs py", 2),
    ("machine_cpu_pct", "box CPU %", 0),
)


def format_markdown(document: Mapping[str, Any]) -> str:
    """A `to_document` document (or its JSON) as a markdown table for docs/benchmarks.md: one row
    per result in run order, ratios included, then the machine and the settings."""

    def cell(value: Any, digits: int | None) -> str:
        if value is None:
            return "-"
        if digits is None or not isinstance(value, (int, float)):
            return str(value)
        return f"{value:,.{digits}f}"

    lines = ["| " + " | ".join(title for _, title, _ in _MARKDOWN_COLUMNS) + " |",
             "|" + "|".join("---" if digits is None else "---:" for _, _, digits in _MARKDOWN_COLUMNS) + "|"]
    for result in document.get("results", []):
        lines.append("| " + " | ".join(cell(result.get(key), digits) for key, _, digits in _MARKDOWN_COLUMNS) + " |")
    machine = document.get("machine", {})
    lines.append("")
    lines.append(f"Machine: {machine.get('cpus')} CPUs, {machine.get('platform')}, Python {machine.get('python')}. "
                 "Settings: " + ", ".join(f"{k}={v}" for k, v in document.get("settings", {}).items()) + ".")
    for failure in document.get("failures", []):
        lines.append(f"FAILED {failure['scenario']}: {failure['error']}")
    return "\n".join(lines)
