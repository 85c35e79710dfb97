"""`medagent bench`: run the end-to-end benchmark matrix and print a table or one JSON document.

The matrix is ACK modes x connection counts x implementations (Cython "c", pure "py") x clients
(medagent's loadgen, the independent C client), plus, per connection count, the independent C
echo-ACK server as the machine's ceiling. Every scenario starts its own system under test in
separate processes (see `medagent.bench.harness`). On a terminal one progress line per
scenario goes to stderr as it completes; the table (or, with --json, one JSON document) goes to
stdout at the end.

Exit status: 0 all scenarios measured; 1 the system under test failed to start (its output
tail is printed) or a scenario failed; 2 usage error (bad list, unknown mode, missing binary
for an explicitly requested target or client).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from medagent.bench.harness import (
    MODES,
    BenchSettings,
    ClientKind,
    Scenario,
    ScenarioNotApplicable,
    ScenarioResult,
    SystemStartError,
    Target,
    client_supports,
    run,
)
from medagent.bench.ctools import CToolError, c_tool
from medagent.bench.loadgen import LoadError, default_procs
from medagent.bench.report import Failure, format_table, to_document

__all__ = ["register", "run_bench", "build_matrix"]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
IMPLS: Final = {"both": ("c", "py"), "c": ("c",), "py": ("py",)}

T = TypeVar("T")


class UsageError(ValueError):
    """A command-line value the matrix cannot be built from."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="end-to-end MLLP load benchmark of `medagent serve` (and the C reference server)",
        description="Start `medagent serve` per scenario in separate processes, drive it with lock-step "
                    "MLLP senders and report msg/s, latency percentiles and CPU. See docs/benchmarks.md.",
    )
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated ACK modes (default: {','.join(MODES)})")
    parser.add_argument("--conns", default="1,10,50", help="comma-separated connection counts (default: 1,10,50)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds, not measured (default 2)")
    parser.add_argument("--impl", choices=tuple(IMPLS), default="both",
                        help="agent implementation: Cython extensions (c), pure Python (py) or both")
    parser.add_argument("--target", choices=("both", "medagent", "c-echo"), default="both",
                        help="system under test; 'both' adds the C echo server when it is built (default)")
    parser.add_argument("--client", choices=("medagent", "c", "both"), default="medagent",
                        help="load client: medagent's loadgen, the C client, or both (default medagent)")
    parser.add_argument("--procs", type=int, default=None,
                        help="loadgen worker processes sharing the connections (default: 1 on <= 4 CPUs)")
    parser.add_argument("--max-messages", type=int, default=50_000_000,
                        help="safety bound on messages per scenario (default 50,000,000)")
    parser.add_argument("--c-server", type=Path, default=None,
                        help="C echo-ACK server binary (default: the shipped source, built on first use)")
    parser.add_argument("--c-client", type=Path, default=None,
                        help="C load client binary (default: the shipped source, built on first use)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.set_defaults(handler=run_bench)


# ---------------------------------------------------------------------------------------------
# Arguments -> matrix
# ---------------------------------------------------------------------------------------------


def _csv(text: str, convert: Callable[[str], T], what: str) -> list[T]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"--{what} needs at least one value")
    try:
        return [convert(item) for item in items]
    except ValueError as exc:
        raise UsageError(f"--{what}: {exc}") from None


def _mode(value: str) -> str:
    if value not in MODES:
        raise ValueError(f"unknown ACK mode {value!r}; choose from {', '.join(MODES)}")
    return value


def _conns(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 10_000:
        raise ValueError(f"connection count must be 1..10000, not {number}")
    return number


def _binary(given: Path | None, tool: str, needed: bool, what: str) -> Path | None:
    """An explicit path, else the shipped C source built on demand (see medagent.bench.ctools)."""
    if given is not None:
        if not given.is_file():
            raise UsageError(f"{what} {given} does not exist")
        return given
    try:
        return c_tool(tool)
    except CToolError as exc:
        if needed:
            raise UsageError(f"{what}: {exc}") from None
        return None


def build_matrix(modes: Sequence[str], conns: Sequence[int], impls: Sequence[str], targets: Sequence[Target],
                 clients: Sequence[ClientKind]) -> list[Scenario]:
    """The scenarios in run order: per connection count, the C echo server first, then medagent."""
    scenarios = []
    for count in conns:
        if Target.C_ECHO in targets:
            scenarios += [Scenario(Target.C_ECHO, "echo", count, "-", client) for client in clients]
        if Target.MEDAGENT in targets:
            scenarios += [Scenario(Target.MEDAGENT, mode, count, impl, client)
                          for mode in modes for impl in impls for client in clients
                          if client_supports(client, mode)]
    return scenarios


def _settings_and_matrix(args: argparse.Namespace) -> tuple[BenchSettings, list[Scenario]]:
    modes = _csv(args.modes, _mode, "modes")
    conns = _csv(args.conns, _conns, "conns")
    if args.duration <= 0 or args.warmup < 0:
        raise UsageError("--duration must be > 0 and --warmup >= 0")
    if args.procs is not None and not 1 <= args.procs <= 36:
        raise UsageError("--procs must be 1..36")
    if args.max_messages < 1:
        raise UsageError("--max-messages must be at least 1")
    clients = [ClientKind.MEDAGENT, ClientKind.C] if args.client == "both" else [ClientKind(args.client)]
    c_client = _binary(args.c_client, "mllp_client", ClientKind.C in clients, "the C client")
    c_server = _binary(args.c_server, "mllp_server", args.target == "c-echo", "the C echo server")
    targets = [Target.MEDAGENT, Target.C_ECHO] if args.target == "both" else [Target(args.target)]
    if c_server is None:
        targets = [t for t in targets if t is not Target.C_ECHO]
    settings = BenchSettings(duration_s=args.duration, warmup_s=args.warmup, max_messages=args.max_messages,
                             procs=args.procs or default_procs(), c_server=c_server, c_client=c_client)
    return settings, build_matrix(modes, conns, IMPLS[args.impl], targets, clients)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _progress(index: int, total: int, scenario: Scenario, result: ScenarioResult | None, error: str = "") -> None:
    if not sys.stderr.isatty():
        return
    head = f"[{index}/{total}] {scenario.label:<48}"
    if result is None:
        print(f"{head} FAILED: {error.splitlines()[0] if error else ''}", file=sys.stderr, flush=True)
        return
    load = result.load
    p50 = "-" if load.p50_us is None else f"{load.p50_us:,.0f}"
    p99 = "-" if load.p99_us is None else f"{load.p99_us:,.0f}"
    print(f"{head} {load.rate:>10,.0f} msg/s  p50 {p50} µs  p99 {p99} µs  errors {load.errors}",
          file=sys.stderr, flush=True)


def _run_matrix(scenarios: Sequence[Scenario], settings: BenchSettings
                ) -> Iterator[tuple[Scenario, ScenarioResult | None, str]]:
    for scenario in scenarios:
        try:
            yield scenario, run(scenario, settings), ""
        except (LoadError, ScenarioNotApplicable) as exc:
            yield scenario, None, str(exc)


def _settings_summary(settings: BenchSettings) -> dict[str, Any]:
    return {"duration_s": settings.duration_s, "warmup_s": settings.warmup_s, "procs": settings.procs,
            "max_messages": settings.max_messages, "message_bytes": len(settings.message) + 3,
            "c_server": str(settings.c_server or ""), "c_client": str(settings.c_client or "")}


def run_bench(args: argparse.Namespace) -> int:
    try:
        settings, scenarios = _settings_and_matrix(args)
    except UsageError as exc:
        print(f"medagent bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    results: list[ScenarioResult] = []
    failures: list[Failure] = []
    status = EXIT_OK
    try:
        for index, (scenario, result, error) in enumerate(_run_matrix(scenarios, settings), 1):
            _progress(index, len(scenarios), scenario, result, error)
            if result is None:
                failures.append(Failure(scenario.label, error))
                status = EXIT_FAILURE
            else:
                results.append(result)
    except SystemStartError as exc:
        print(f"medagent bench: the system under test did not start: {exc}", file=sys.stderr)
        failures.append(Failure("startup", str(exc)))
        status = EXIT_FAILURE
    summary = _settings_summary(settings)
    if args.json:
        print(json.dumps(to_document(results, failures, summary), indent=2))
    else:
        print(format_table(results, failures, summary))
    return status
