"""`medagent bench`: run the end-to-end benchmark matrix and print a table or one JSON document.

The matrix is ACK modes x connection counts x implementations (Cython "c", pure "py") x clients
(medagent's loadgen, the independent C client), plus, per connection count, the independent C
echo-ACK server as the machine's ceiling and, with ``--peer medplum``, Medplum's own Node HL7
stack (fastack.mjs + sink.mjs from ``--medplum-dir``) in its fast and original modes, driven by
the same C client, so every medagent row carries its ratio to Medplum from the same sitting.
``--baseline-python`` adds medagent rows served by another interpreter's install (impl "base",
e.g. the build before a change). ``--runs N`` repeats the whole matrix N times, alternating the
targets, and reports the median run of every cell (all rates listed below the table). Every scenario starts its own system under test in
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
import os
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from medagent.bench import priority
from medagent.bench.ctools import CToolError, c_tool
from medagent.bench.harness import (
    BASELINE_IMPL,
    MODES,
    BenchSettings,
    ClientKind,
    Scenario,
    ScenarioNotApplicable,
    ScenarioResult,
    SystemStartError,
    Target,
    client_supports,
    medplum_supports,
    run,
)
from medagent.bench.loadgen import LoadError, default_procs
from medagent.bench.report import Failure, format_markdown, format_table, to_document

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
    parser.add_argument("--peer", choices=("none", "medplum"), default="none",
                        help="also run Medplum's Node HL7 stack (fast+forward, original) with the C client")
    parser.add_argument("--medplum-dir", type=Path, default=_env_path("MEDAGENT_MEDPLUM_DIR"),
                        help="folder with fastack.mjs, sink.mjs and npm ci'd node_modules "
                             "(default $MEDAGENT_MEDPLUM_DIR); copied to a temporary directory per run")
    parser.add_argument("--baseline-python", type=Path, default=None,
                        help="python of another medagent install: adds its rows as impl 'base'")
    parser.add_argument("--client-priority", choices=priority.CLIENT_PRIORITIES, default=priority.NORMAL,
                        help="scheduling policy of the C client: normal (default) or realtime (SCHED_FIFO, "
                             "needs root: the woken client never waits for a CPU behind the system under test)")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the matrix N times (alternating targets); report each cell's median")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--markdown", action="store_true",
                        help="print a markdown table (for docs/benchmarks.md) instead of the text table")
    parser.set_defaults(handler=run_bench)
    from medagent.bench import soak  # the `medagent bench soak` subcommand

    soak.register(parser.add_subparsers(title="subcommands", metavar="{soak}"))


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


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
    """The scenarios in run order: per connection count, the C echo server first, then Medplum
    (C client only: that is how its figures are published), then medagent."""
    scenarios = []
    for count in conns:
        if Target.C_ECHO in targets:
            scenarios += [Scenario(Target.C_ECHO, "echo", count, "-", client) for client in clients]
        if Target.MEDPLUM in targets:
            scenarios += [Scenario(Target.MEDPLUM, mode, count, "node", ClientKind.C)
                          for mode in modes if medplum_supports(mode)]
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
    if not 1 <= args.runs <= 100:
        raise UsageError("--runs must be 1..100")
    clients = [ClientKind.MEDAGENT, ClientKind.C] if args.client == "both" else [ClientKind(args.client)]
    peer = args.peer == "medplum"
    if peer and (args.medplum_dir is None or not (args.medplum_dir / "fastack.mjs").is_file()
                 or not (args.medplum_dir / "node_modules").is_dir()):
        raise UsageError("--peer medplum needs --medplum-dir (or $MEDAGENT_MEDPLUM_DIR): a folder with "
                         "fastack.mjs, sink.mjs and node_modules installed by npm ci")
    if args.baseline_python is not None and not args.baseline_python.is_file():
        raise UsageError(f"--baseline-python {args.baseline_python} does not exist")
    if args.client_priority != priority.NORMAL:
        if ClientKind.MEDAGENT in clients:
            raise UsageError(f"--client-priority {args.client_priority} applies to the C client: add --client c")
        try:
            priority.check_allowed(args.client_priority)
        except priority.PriorityError as exc:
            raise UsageError(str(exc)) from None
    c_client = _binary(args.c_client, "mllp_client", ClientKind.C in clients or peer, "the C client")
    c_server = _binary(args.c_server, "mllp_server", args.target == "c-echo", "the C echo server")
    targets = [Target.MEDAGENT, Target.C_ECHO] if args.target == "both" else [Target(args.target)]
    if c_server is None:
        targets = [t for t in targets if t is not Target.C_ECHO]
    if peer:
        targets.append(Target.MEDPLUM)
    impls = IMPLS[args.impl] + ((BASELINE_IMPL,) if args.baseline_python is not None else ())
    settings = BenchSettings(duration_s=args.duration, warmup_s=args.warmup, max_messages=args.max_messages,
                             procs=args.procs or default_procs(), c_server=c_server, c_client=c_client,
                             medplum_dir=args.medplum_dir, baseline_python=args.baseline_python,
                             client_priority=args.client_priority)
    return settings, build_matrix(modes, conns, impls, targets, clients) * args.runs


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


def _medians(results: Sequence[ScenarioResult]) -> tuple[list[ScenarioResult], list[str]]:
    """Per scenario (first-seen order) the run with the median rate, and one line listing every
    run's rate where a scenario ran more than once (the spread shows how noisy the machine was)."""
    by_label: dict[str, list[ScenarioResult]] = {}
    for result in results:
        by_label.setdefault(result.scenario.label, []).append(result)
    chosen, spread = [], []
    for label, runs in by_label.items():
        ordered = sorted(runs, key=lambda r: r.load.rate)
        chosen.append(ordered[(len(ordered) - 1) // 2])
        if len(runs) > 1:
            rates = [r.load.rate for r in runs]
            spread.append(f"runs {label}: " + ", ".join(f"{rate:,.0f}" for rate in rates)
                          + f" (median {statistics.median(rates):,.0f})")
    return chosen, spread


def _settings_summary(settings: BenchSettings) -> dict[str, Any]:
    return {"duration_s": settings.duration_s, "warmup_s": settings.warmup_s, "procs": settings.procs,
            "max_messages": settings.max_messages, "message_bytes": len(settings.message) + 3,
            "c_server": str(settings.c_server or ""), "c_client": str(settings.c_client or ""),
            "medplum_dir": str(settings.medplum_dir or ""), "baseline_python": str(settings.baseline_python or ""),
            "client_priority": settings.client_priority}


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
    medians, spread = _medians(results)
    summary["runs"] = args.runs
    if args.json or args.markdown:
        document = to_document(medians, failures, summary)
        document["all_runs"] = [result.to_dict() for result in results]
        print(json.dumps(document, indent=2) if args.json else format_markdown(document))
        if args.markdown and spread:
            print("\n" + "\n".join(f"- {line}" for line in spread))
    else:
        print(format_table(medians, failures, summary))
        if spread:
            print("\n".join(spread))
    return status
