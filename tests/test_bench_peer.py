"""`medagent bench --peer medplum`: ratios to Medplum's rows, CPU per message, medians of runs,
usage errors, and (when node and the Medplum bench folder exist) one real scenario against
Medplum's Node stack driven by the C client. No timing assertions: counts and shapes only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import time
from pathlib import Path

import pytest

from medagent.bench import cli as bench_cli
from medagent.bench import priority
from medagent.bench.ctools import CToolError, c_tool
from medagent.bench.harness import BenchSettings, ClientKind, Scenario, ScenarioResult, Target, run
from medagent.bench.loadgen import LoadResult
from medagent.bench.report import format_table, rows, to_document

MEDPLUM_DIR = Path(os.environ.get("MEDAGENT_MEDPLUM_DIR", "/work/medplum-node"))


def result(target: Target, mode: str, impl: str, rate: float, *, sut: float = 80.0,
           agent: float = 60.0) -> ScenarioResult:
    load = LoadResult("c", 10, 1, int(rate), 1.0, rate, 100.0, 200.0, None, None, 0, 0, 0, 0, 5.0)
    return ScenarioResult(Scenario(target, mode, 10, impl, ClientKind.C), load, sut, agent, "", 150.0)


def test_medagent_rows_carry_their_ratio_to_medplum_of_the_same_mode() -> None:
    results = [result(Target.MEDPLUM, "fast", "node", 10_000.0),
               result(Target.MEDPLUM, "original", "node", 8_000.0),
               result(Target.MEDAGENT, "fast", "c", 25_000.0),
               result(Target.MEDAGENT, "original", "c", 4_000.0),
               result(Target.MEDAGENT, "immediate", "c", 40_000.0)]
    ratios = {(r.result.scenario.target, r.result.scenario.mode): r.vs_medplum for r in rows(results)}
    assert ratios[(Target.MEDAGENT, "fast")] == 2.5
    assert ratios[(Target.MEDAGENT, "original")] == 0.5
    assert ratios[(Target.MEDAGENT, "immediate")] is None  # Medplum has no such mode
    assert ratios[(Target.MEDPLUM, "fast")] is None
    document = to_document(results)
    assert [r["vs_medplum"] for r in document["results"]] == [None, None, 2.5, 0.5, None]
    assert "vs Medplum" in format_table(results)


def test_cpu_per_message_splits_agent_and_hub() -> None:
    measured = result(Target.MEDAGENT, "fast", "c", 20_000.0, sut=80.0, agent=60.0)
    assert measured.hub_cpu_pct == 20.0
    assert measured.agent_us_per_msg == 30.0  # 0.6 CPU-s per s / 20,000 msg per s
    assert measured.hub_us_per_msg == 10.0
    assert measured.to_dict()["machine_cpu_pct"] == 150.0
    assert result(Target.MEDAGENT, "fast", "c", 0.0).agent_us_per_msg is None


def test_median_of_runs_and_the_spread_line() -> None:
    runs = [result(Target.MEDAGENT, "fast", "c", rate) for rate in (300.0, 100.0, 200.0)]
    chosen, spread = bench_cli._medians(runs + [result(Target.MEDPLUM, "fast", "node", 50.0)])
    assert [r.load.rate for r in chosen] == [200.0, 50.0]
    assert len(spread) == 1 and "300, 100, 200 (median 200)" in spread[0]


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medagent")
    bench_cli.register(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


@pytest.mark.parametrize("argv", [("--peer", "medplum", "--medplum-dir", "/nonexistent"),
                                  ("--runs", "0"), ("--baseline-python", "/nonexistent/python"),
                                  ("--client-priority", "realtime")])  # the Python client: C only
def test_usage_errors_exit_2(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_cli.run_bench(bench_args(*argv)) == bench_cli.EXIT_USAGE
    assert "medagent bench:" in capsys.readouterr().err


def test_matrix_puts_medplum_before_medagent_and_only_in_its_modes(tmp_path: Path) -> None:
    matrix = bench_cli.build_matrix(["fast", "immediate"], [1, 10], ["c"], [Target.MEDAGENT, Target.MEDPLUM],
                                    [ClientKind.C])
    assert [(s.target, s.mode, s.conns) for s in matrix] == [
        (Target.MEDPLUM, "fast", 1), (Target.MEDAGENT, "fast", 1), (Target.MEDAGENT, "immediate", 1),
        (Target.MEDPLUM, "fast", 10), (Target.MEDAGENT, "fast", 10), (Target.MEDAGENT, "immediate", 10)]


def _c_client() -> Path | None:
    try:
        return c_tool("mllp_client")
    except CToolError:
        return None


@pytest.mark.skipif(shutil.which("node") is None or not (MEDPLUM_DIR / "node_modules").is_dir(),
                    reason="needs node and the Medplum bench folder with node_modules")
@pytest.mark.parametrize("mode", ["fast", "original"])
def test_real_medplum_stack_answers_the_c_client(mode: str) -> None:
    client = _c_client()
    if client is None:
        pytest.skip("no C compiler for the C client")
    # Node's first answers (its websocket to the sink, the JIT) can take most of a second on a
    # loaded 2-core CI box: a 0.2 s warm-up once left the 0.5 s window without an ACK. The
    # message bound counts the warm-up too, so it must outlast it.
    settings = BenchSettings(duration_s=0.5, warmup_s=1.0, max_messages=50_000, c_client=client,
                             medplum_dir=MEDPLUM_DIR)
    measured = run(Scenario(Target.MEDPLUM, mode, 2, "node", ClientKind.C), settings)
    assert measured.load.messages > 0 and measured.load.bad_acks == 0
    assert measured.sut_cpu_pct is not None and measured.agent_cpu_pct is not None


def test_c_client_reports_its_tail_against_the_c_echo_server() -> None:
    """The C client's p99.9, max and slow-time share reach the result and the table."""
    client = _c_client()
    if client is None:
        pytest.skip("no C compiler for the C client")
    settings = BenchSettings(duration_s=0.5, warmup_s=0.2, max_messages=50_000, c_client=client,
                             c_server=c_tool("mllp_server"))
    measured = run(Scenario(Target.C_ECHO, "echo", 2, "-", ClientKind.C), settings)
    load = measured.load
    assert load.messages > 0 and load.bad_acks == 0
    assert load.p50_us is not None and load.p99_us is not None and load.p999_us is not None and load.max_us is not None
    assert load.p50_us <= load.p99_us <= load.p999_us <= load.max_us
    assert load.slow_time_pct is not None and 0.0 <= load.slow_time_pct <= 100.0
    assert "≥1ms time%" in format_table([measured])


def _client_policies() -> set[tuple[int, int]]:
    """(pid, scheduling policy) of every C load client this test process started (/proc)."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if comm.startswith("mllp_client") and int(fields[1]) == os.getpid():  # field 4: ppid
            found.add((int(entry.name), int(fields[38])))  # field 41: policy
    return found


def test_realtime_client_priority_runs_the_c_client_under_sched_fifo() -> None:
    """--client-priority realtime: the client is under SCHED_FIFO while it measures, and the
    run's settings say so."""
    client = _c_client()
    if client is None:
        pytest.skip("no C compiler for the C client")
    try:
        priority.check_allowed(priority.REALTIME)
    except priority.PriorityError as exc:  # CI runs as root: there it always runs
        pytest.skip(str(exc))
    settings = BenchSettings(duration_s=1.0, warmup_s=0.3, max_messages=50_000, c_client=client,
                             c_server=c_tool("mllp_server"), client_priority=priority.REALTIME)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(run, Scenario(Target.C_ECHO, "echo", 1, "-", ClientKind.C), settings)
        seen: set[tuple[int, int]] = set()
        deadline = time.monotonic() + 10
        while not running.done() and time.monotonic() < deadline:
            seen |= _client_policies()
            time.sleep(0.05)
        measured = running.result(timeout=30)
    assert measured.load.messages > 0 and measured.load.bad_acks == 0
    assert seen and all(policy == os.SCHED_FIFO for _pid, policy in seen), seen
    assert bench_cli._settings_summary(settings)["client_priority"] == "realtime"


def test_markdown_table_has_every_result_and_its_ratios() -> None:
    from medagent.bench.report import format_markdown

    results = [result(Target.MEDPLUM, "fast", "node", 10_000.0), result(Target.MEDAGENT, "fast", "c", 25_000.0)]
    text = format_markdown(to_document(results, [], {"runs": 3}))
    lines = text.splitlines()
    assert lines[0].startswith("| target | mode | senders |") and len([ln for ln in lines if ln.startswith("| m")]) == 2
    assert "| 2.50 |" in lines[3] and "runs=3" in text
