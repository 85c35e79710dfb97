"""`medagent bench soak`: does sustained equal burst? A long fast-mode run, watched per window.

Theory of operation
-------------------
The soak starts `medagent serve` exactly as one `medagent bench` scenario does (one MLLP
channel in the given ACK mode, the embedded hub and the ACK bot, a fresh temporary data
directory; see `medagent.bench.harness`), then one worker process (``python -P -c``, uvloop)
runs N lock-step senders (`loadgen.run_senders`) for the whole duration with a `Monitor` that
prints one JSON line per window: measured ACKs and the slowest send-to-ACK time in the window.
The slowest ACK of a lock-step load is the longest stall any sender saw: while the agent's
intake stops, every sender waits. For every window line the coordinator (this process) samples
from /proc the RSS and open fds of the agent (`medagent serve`) and of the hub (its process
tree minus the agent), and the bytes on disk of the agent's queue (data directory minus
``hub/``) and of the hub's data directory, and prints a row.

The summary compares the sustained rate (all measured ACKs / measured seconds) with the burst
rate (the first window), gives the longest stall and the window it was in, RSS growth from the
first to the last window (target: within 10 %) and bytes on disk per message.

Invariants
----------
* Every process the soak starts (system under test, worker) is stopped before `run_soak`
  returns or raises; the worker also ends by itself at the end of its schedule.
* The worker measures ACKs only inside its schedule; windows are contiguous and cover the
  measured time exactly once (the last one may be shorter).
* Loopback only; message bodies are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from medagent.bench.harness import (
    BenchSettings,
    ClientKind,
    ProcessTreeCpu,
    Scenario,
    SystemStartError,
    Target,
    system_under_test,
)
from medagent.bench.loadgen import LoadError, LoadSpec, Schedule, _new_event_loop, run_senders

__all__ = ["SoakReport", "SoakSpec", "SoakWindow", "format_summary", "main_worker", "register", "run_soak"]

_WORKER_COMMAND: Final = "from medagent.bench.soak import main_worker; main_worker()"
_START_LEAD_S: Final = 0.5
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SoakWindow:
    """One window: the client's view and the processes' footprint at its end."""

    index: int
    end_s: float  # seconds since the measured start
    seconds: float
    messages: int
    max_ack_ms: float
    agent_rss_mb: float | None
    hub_rss_mb: float | None
    agent_fds: int | None
    hub_fds: int | None
    agent_disk_mb: float
    hub_disk_mb: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
class SoakReport:
    mode: str
    conns: int
    impl: str
    window_s: float
    windows: list[SoakWindow] = field(default_factory=list)
    errors: int = 0

    @property
    def messages(self) -> int:
        return sum(w.messages for w in self.windows)

    @property
    def sustained_rate(self) -> float:
        seconds = sum(w.seconds for w in self.windows)
        return self.messages / seconds if seconds > 0 else 0.0

    @property
    def burst_rate(self) -> float:
        return self.windows[0].rate if self.windows else 0.0

    @property
    def longest_stall(self) -> SoakWindow | None:
        return max(self.windows, key=lambda w: w.max_ack_ms, default=None)

    def growth(self, attribute: str) -> float | None:
        """Last window's value / first window's value - 1 (RSS growth), None without data."""
        values = [getattr(w, attribute) for w in self.windows if getattr(w, attribute) is not None]
        if len(values) < 2 or not values[0]:
            return None
        return round(values[-1] / values[0] - 1.0, 3)

    def bytes_per_message(self, attribute: str) -> float | None:
        if not self.windows or not self.messages:
            return None
        return round(getattr(self.windows[-1], attribute) * 1e6 / self.messages, 0)

    def to_dict(self) -> dict[str, Any]:
        stall = self.longest_stall
        return {
            "mode": self.mode, "conns": self.conns, "impl": self.impl, "window_s": self.window_s,
            "messages": self.messages, "errors": self.errors,
            "sustained_rate": round(self.sustained_rate, 1), "burst_rate": round(self.burst_rate, 1),
            "sustained_vs_burst": round(self.sustained_rate / self.burst_rate, 3) if self.burst_rate else None,
            "longest_stall_ms": stall.max_ack_ms if stall else None,
            "longest_stall_window": stall.index if stall else None,
            "agent_rss_growth": self.growth("agent_rss_mb"), "hub_rss_growth": self.growth("hub_rss_mb"),
            "agent_bytes_per_msg": self.bytes_per_message("agent_disk_mb"),
            "hub_bytes_per_msg": self.bytes_per_message("hub_disk_mb"),
            "windows": [{**asdict(w), "rate": round(w.rate, 1)} for w in self.windows],
        }


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _sum(values: Sequence[float | int | None]) -> Any:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _disk_mb(path: Path, skip: Path | None = None) -> float:
    """Allocated bytes (st_blocks) under `path`, without `skip`, in MB (10**6)."""
    total = 0
    for root, dirs, files in os.walk(path):
        if skip is not None:
            dirs[:] = [d for d in dirs if Path(root, d) != skip]
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass  # a file that vanished between listing and stat (WAL reset, rotation)
    return total / 1e6


class Footprint:
    """RSS, fds and disk of the agent (`root_pid`) and of the hub (its other descendants)."""

    def __init__(self, root_pid: int, data_dir: Path) -> None:
        self.tree = ProcessTreeCpu(root_pid)
        self.data_dir = data_dir
        self.hub_dir = data_dir / "hub"

    def sample(self) -> dict[str, Any]:
        pids = self.tree.members()
        hub = [pid for pid in pids if pid != self.tree.root_pid]
        return {
            "agent_rss_mb": _round(_rss_mb(self.tree.root_pid)),
            "hub_rss_mb": _round(_sum([_rss_mb(pid) for pid in hub])),
            "agent_fds": _fds(self.tree.root_pid),
            "hub_fds": _sum([_fds(pid) for pid in hub]),
            "agent_disk_mb": round(_disk_mb(self.data_dir, skip=self.hub_dir), 1),
            "hub_disk_mb": round(_disk_mb(self.hub_dir), 1) if self.hub_dir.exists() else 0.0,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# ---------------------------------------------------------------------------------------------
# The worker (client) process
# ---------------------------------------------------------------------------------------------


def _emit(kind: str, payload: Any) -> None:
    sys.stdout.write(json.dumps([kind, payload]) + "\n")
    sys.stdout.flush()


async def _windows(schedule: Schedule, take_window: Callable[[], tuple[int, int]], window_s: float) -> None:
    """Emit one ["window", ...] line per `window_s` of measured time until cancelled."""
    take_window()  # drop anything counted before the measured start
    edge = schedule.warm_end_ns
    index = 0
    while True:
        edge = min(edge + int(window_s * 1e9), schedule.end_ns)
        await asyncio.sleep(max(0.0, (edge - time.monotonic_ns()) / 1e9))
        acks, slowest_ns = take_window()
        index += 1
        _emit("window", {"index": index, "end_ns": edge, "messages": acks, "max_ack_ns": slowest_ns})
        if edge >= schedule.end_ns:
            return


def main_worker() -> None:
    """Entry point of the worker process: one JSON job on stdin, JSON lines on stdout."""
    try:
        job = json.loads(sys.stdin.readline())
        spec = LoadSpec.for_mode(job["mode"], "127.0.0.1", job["port"], job["conns"], job["duration_s"],
                                 warmup_s=job["warmup_s"], max_messages=job["max_messages"])
        schedule = Schedule.starting_in(_START_LEAD_S, spec.warmup_s, spec.duration_s)
        _emit("schedule", [schedule.start_ns, schedule.warm_end_ns, schedule.end_ns])

        async def monitor(schedule: Schedule, take_window: Callable[[], tuple[int, int]]) -> None:
            await _windows(schedule, take_window, job["window_s"])

        with asyncio.Runner(loop_factory=_new_event_loop) as runner:
            result = runner.run(run_senders(spec, schedule, monitor=monitor))
        _emit("result", result.to_dict())
    except Exception as exc:  # noqa: BLE001 - reported to the coordinator
        _emit("error", f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# The coordinator
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SoakSpec:
    duration_s: float = 600.0
    window_s: float = 10.0
    warmup_s: float = 2.0
    conns: int = 10
    mode: str = "fast"
    impl: str = "c"
    max_messages: int = 500_000_000
    retention_max_mb: int | None = None  # the agent's size cap (default: the config default)


def _worker_lines(process: subprocess.Popen[str], deadline: float) -> Any:
    """Yield (kind, payload) from the worker until it ends or `deadline` (monotonic) passes."""
    assert process.stdout is not None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LoadError("the soak worker did not finish in time")
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if not ready:
            continue
        line = process.stdout.readline()
        if not line:
            return
        kind, payload = json.loads(line)
        if kind == "error":
            raise LoadError(f"the soak worker failed: {payload}")
        yield kind, payload


def run_soak(spec: SoakSpec, on_window: Callable[[SoakWindow], None] = lambda window: None) -> SoakReport:
    """Run the soak (see the module docstring); `on_window` sees every window as it closes."""
    report = SoakReport(spec.mode, spec.conns, spec.impl, spec.window_s)
    settings = BenchSettings(duration_s=spec.duration_s, warmup_s=spec.warmup_s)
    scenario = Scenario(Target.MEDAGENT, spec.mode, spec.conns, spec.impl, ClientKind.MEDAGENT)
    extra = {} if spec.retention_max_mb is None else {"retention_max_mb": spec.retention_max_mb}
    with tempfile.TemporaryDirectory(prefix="medagent-soak-") as tmp:
        workdir = Path(tmp)
        with system_under_test(scenario, settings, workdir, agent_options=extra) as (process, port, _cpu):
            footprint = Footprint(process.pid, workdir / "data")
            job = {"mode": spec.mode, "port": port, "conns": spec.conns, "duration_s": spec.duration_s,
                   "warmup_s": spec.warmup_s, "max_messages": spec.max_messages, "window_s": spec.window_s}
            worker = subprocess.Popen([sys.executable, "-P", "-c", _WORKER_COMMAND], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert worker.stdin is not None
                worker.stdin.write(json.dumps(job) + "\n")
                worker.stdin.close()
                deadline = time.monotonic() + spec.warmup_s + spec.duration_s + 120.0
                warm_end_ns = 0
                previous_ns = 0
                for kind, payload in _worker_lines(worker, deadline):
                    if kind == "schedule":
                        warm_end_ns = previous_ns = payload[1]
                    elif kind == "window":
                        window = SoakWindow(
                            index=payload["index"], end_s=round((payload["end_ns"] - warm_end_ns) / 1e9, 1),
                            seconds=(payload["end_ns"] - previous_ns) / 1e9, messages=payload["messages"],
                            max_ack_ms=round(payload["max_ack_ns"] / 1e6, 2), **footprint.sample())
                        previous_ns = payload["end_ns"]
                        report.windows.append(window)
                        on_window(window)
                    elif kind == "result":
                        report.errors = (payload["bad_acks"] + payload["timeouts"] + payload["disconnects"]
                                         + payload["unanswered"])
            finally:
                if worker.poll() is None:
                    worker.kill()
                worker.wait(10)
    return report


# ---------------------------------------------------------------------------------------------
# Command line: `medagent bench soak`
# ---------------------------------------------------------------------------------------------


_HEADER = (f"{'window':>6} {'t s':>6} {'msg/s':>9} {'max ACK ms':>10} {'agent RSS MB':>12} "
           f"{'hub RSS MB':>10} {'agent fds':>9} {'hub fds':>7} {'agent disk MB':>13} {'hub disk MB':>11}")


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def format_window(w: SoakWindow) -> str:
    return (f"{w.index:>6} {w.end_s:>6.0f} {w.rate:>9,.0f} {w.max_ack_ms:>10.1f} {_cell(w.agent_rss_mb):>12} "
            f"{_cell(w.hub_rss_mb):>10} {_cell(w.agent_fds):>9} {_cell(w.hub_fds):>7} "
            f"{w.agent_disk_mb:>13,.1f} {w.hub_disk_mb:>11,.1f}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f} %"


def format_summary(report: SoakReport) -> str:
    d = report.to_dict()
    return "\n".join([
        (f"soak: {report.mode} mode, {report.conns} senders, impl {report.impl}, {len(report.windows)} windows of "
         f"{report.window_s:g} s, {report.messages:,} messages, {report.errors} errors"),
        (f"sustained {d['sustained_rate']:,.0f} msg/s, burst (first window) {d['burst_rate']:,.0f} msg/s, "
         f"sustained/burst {d['sustained_vs_burst']}"),
        f"longest stall (slowest ACK) {_cell(d['longest_stall_ms'], 1)} ms in window {d['longest_stall_window']}",
        f"RSS growth first->last window: agent {_pct(d['agent_rss_growth'])}, hub {_pct(d['hub_rss_growth'])}",
        f"bytes on disk per message: agent {_cell(d['agent_bytes_per_msg'], 0)}, hub {_cell(d['hub_bytes_per_msg'], 0)}",
    ])


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "soak", help="long run watched per window: throughput, longest stall, RSS, fds, disk",
        description="Run `medagent serve` under lock-step load for a long time and report per window.")
    parser.add_argument("--duration", type=float, default=600.0, help="measured seconds (default 600)")
    parser.add_argument("--window", type=float, default=10.0, help="window length in seconds (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured warm-up seconds (default 2)")
    parser.add_argument("--conns", type=int, default=10, help="lock-step senders (default 10)")
    parser.add_argument("--mode", choices=("fast", "immediate", "original"), default="fast")
    parser.add_argument("--impl", choices=("c", "py"), default="c")
    parser.add_argument("--retention-max-mb", type=int, default=None,
                        help="the agent's queue size cap (agent.retention_max_mb; default: config default)")
    parser.add_argument("--json", action="store_true", help="print one JSON document at the end")
    parser.set_defaults(handler=run_soak_cli)


def run_soak_cli(args: argparse.Namespace) -> int:
    if args.duration <= 0 or args.window <= 0 or args.warmup < 0 or not 1 <= args.conns <= 1296:
        print("medagent bench soak: --duration and --window must be > 0, --warmup >= 0, --conns 1..1296",
              file=sys.stderr)
        return EXIT_USAGE
    if args.retention_max_mb is not None and args.retention_max_mb < 1:
        print("medagent bench soak: --retention-max-mb must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    spec = SoakSpec(duration_s=args.duration, window_s=args.window, warmup_s=args.warmup, conns=args.conns,
                    mode=args.mode, impl=args.impl, retention_max_mb=args.retention_max_mb)
    stream = sys.stderr if args.json else sys.stdout
    print(_HEADER, file=stream, flush=True)
    try:
        report = run_soak(spec, lambda w: print(format_window(w), file=stream, flush=True))
    except (SystemStartError, LoadError) as exc:
        print(f"medagent bench soak: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_summary(report))
    return EXIT_OK if report.windows and not report.errors else EXIT_FAILURE
