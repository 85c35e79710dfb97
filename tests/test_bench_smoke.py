"""Functional smoke tests of `medagent bench`'s load generator, report and command line.

The load generator runs against a real asyncio echo-ACK server started in the test on
127.0.0.1 (port 0). Nothing here asserts on timing: counts, ACK checks and control ids only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from medagent.bench import cli as bench_cli
from medagent.bench.harness import ClientKind, ProcessTreeCpu, Scenario, ScenarioResult, Target
from medagent.bench.loadgen import (
    SAMPLE_ADT_A01,
    LatencyHistogram,
    LoadError,
    LoadResult,
    LoadSpec,
    WorkerResult,
    frame_template,
    run_load,
    run_senders,
)
from medagent.bench.report import Failure, format_table, rows, to_document

SB, EB, CR = b"\x0b", b"\x1c", b"\r"
#: Upper bound of every load in this file (they stop at max_messages long before).
DURATION_S = 10.0

#: The frames to answer a message with; None closes the connection instead.
AckFactory = Callable[[bytes], "list[bytes] | None"]


def control_id(message: bytes) -> bytes:
    return message.split(b"\r", 1)[0].split(b"|")[9]


def ack(code: str, msh10: bytes) -> bytes:
    return SB + b"MSH|^~\\&|R|F|S|F|20240101||ACK^A01^ACK|X1|P|2.5.1\rMSA|" + code.encode() + b"|" + msh10 + b"|OK\r" + EB + CR


def aa(message: bytes) -> list[bytes]:
    return [ack("AA", control_id(message))]


@dataclass
class EchoServer:
    """Answers each MLLP frame with the frames `answer(message)` returns; records MSH-10s."""


    answer: AckFactory
    received: list[bytes] = field(default_factory=list)
    port: int = 0

    def protocol(self) -> asyncio.Protocol:
        server = self

        class Echo(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                self.buffer = b""

            def data_received(self, data: bytes) -> None:
                self.buffer += data
                while (end := self.buffer.find(EB)) >= 0:
                    message = self.buffer[self.buffer.index(SB) + 1:end]
                    self.buffer = self.buffer[end + 2:]
                    server.received.append(control_id(message))
                    frames = server.answer(message)
                    if frames is None:
                        self.transport.close()
                        return
                    self.transport.write(b"".join(frames))  # type: ignore[attr-defined]

        return Echo()


@pytest.fixture
async def echo_server() -> AsyncIterator[Callable[[AckFactory], EchoServer]]:
    servers: list[asyncio.Server] = []

    async def start(answer: AckFactory) -> EchoServer:
        echo = EchoServer(answer)
        server = await asyncio.get_running_loop().create_server(echo.protocol, "127.0.0.1", 0)
        servers.append(server)
        echo.port = server.sockets[0].getsockname()[1]
        return echo

    # The factory is async; wrap so tests can `await start(...)`.
    yield start  # type: ignore[misc]
    for server in servers:
        server.close()
        await server.wait_closed()


def spec(port: int, conns: int = 3, max_messages: int = 300, **options: object) -> LoadSpec:
    return LoadSpec("127.0.0.1", port, conns, DURATION_S, warmup_s=0.0, max_messages=max_messages,
                    **options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Histogram and template
# --------------------------------------------------------------------------------------------


def test_histogram_percentiles_are_within_bucket_precision() -> None:
    histogram = LatencyHistogram()
    for value in range(1, 100_001):
        histogram.record(value * 1000)  # 1 µs .. 100 ms
    assert histogram.total == 100_000
    for fraction, exact in ((0.5, 50_000_000), (0.99, 99_000_000), (0.999, 99_900_000)):
        got = histogram.percentile_ns(fraction)
        assert got is not None and abs(got - exact) / exact < 0.005
    assert histogram.percentile_ns(1.0) == histogram.max_ns == 100_000_000
    assert LatencyHistogram().percentile_ns(0.5) is None


def test_histogram_time_share_of_slow_values() -> None:
    """99 ACKs of 100 µs and one of 9.9 ms: half of all the waiting was in the slow one."""
    histogram = LatencyHistogram()
    for _ in range(99):
        histogram.record(100_000)
    histogram.record(9_900_000)
    share = histogram.time_share_at_least(1_000_000)
    assert share is not None and abs(share - 0.5) < 0.005
    assert histogram.time_share_at_least(10_000_000) == 0.0
    assert histogram.time_share_at_least(0) == 1.0
    assert LatencyHistogram().time_share_at_least(1_000_000) is None


def test_histogram_buckets_are_contiguous_and_bounds_hold() -> None:
    previous = -1
    for value in [*range(0, 5000), *range(5000, 10**7, 997)]:
        index = LatencyHistogram.bucket_of(value)
        assert index >= previous
        assert value <= LatencyHistogram.bucket_high(index)
        previous = index


def test_histogram_merge_equals_recording_everything_once() -> None:
    a, b, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for value in range(0, 10**6, 7919):
        (a if value % 2 else b).record(value)
        both.record(value)
    a.merge(LatencyHistogram.from_dict(b.to_dict()))
    assert (a.counts, a.total, a.max_ns) == (both.counts, both.total, both.max_ns)


def test_frame_template_splits_around_msh10() -> None:
    head, tail, width = frame_template(SAMPLE_ADT_A01)
    assert len(head) + width + len(tail) == 625
    assert head.startswith(SB) and head.endswith(b"ADT^A01^ADT_A01|") and tail.startswith(b"|P|2.5.1\r")
    assert tail.endswith(EB + CR) and width == 12
    with pytest.raises(LoadError):
        frame_template(b"PID|1\r")
    with pytest.raises(LoadError):
        frame_template(b"MSH|^~\\&|A|B\r")


# --------------------------------------------------------------------------------------------
# Lock-step senders against a real server
# --------------------------------------------------------------------------------------------


async def test_senders_count_every_ack_with_unique_control_ids(echo_server) -> None:
    server = await echo_server(aa)
    result = await run_senders(spec(server.port))
    assert result.messages + result.warmup_messages == len(server.received) >= 300
    assert len(set(server.received)) == len(server.received)
    assert all(len(cid) == 12 for cid in server.received)
    assert (result.bad_acks, result.timeouts, result.disconnects, result.late_acks) == (0, 0, 0, 0)
    assert result.histogram.total == result.messages and result.window_s > 0


async def test_wrong_msa1_code_counts_as_bad_ack_and_advances(echo_server) -> None:
    server = await echo_server(lambda m: [ack("AE", control_id(m))])
    result = await run_senders(spec(server.port, conns=2, max_messages=50))
    assert result.bad_acks == len(server.received) >= 50


async def test_wrong_msa2_counts_as_bad_ack_then_times_out(echo_server) -> None:
    server = await echo_server(lambda m: [ack("AA", b"NOT-THIS-ONE")])
    result = await run_senders(spec(server.port, conns=2, ack_timeout_s=0.3))
    assert result.bad_acks == 2 and result.timeouts == 2 and result.messages == 0


async def test_two_phase_counts_commit_ack_and_late_application_ack(echo_server) -> None:
    server = await echo_server(lambda m: [ack("CA", control_id(m)), ack("AA", control_id(m))])
    two_phase = LoadSpec.for_mode("two-phase", "127.0.0.1", server.port, 2, DURATION_S,
                                  warmup_s=0.0, max_messages=100)
    result = await run_senders(two_phase)
    assert result.messages >= 100 and result.bad_acks == 0
    assert result.late_acks >= result.messages - 2  # the last app ACKs may arrive after closing


async def test_server_closing_connections_counts_disconnects(echo_server) -> None:
    server = await echo_server(lambda message: None)
    result = await run_senders(spec(server.port, conns=2))
    assert result.disconnects == 2 and result.messages == 0


async def test_silent_server_leaves_unanswered_messages_counted_as_errors(echo_server) -> None:
    server = await echo_server(lambda message: [])
    silent = LoadSpec("127.0.0.1", server.port, 2, 0.3, warmup_s=0.0, ack_timeout_s=60.0)
    result = await run_senders(silent)
    assert result.unanswered == 2 and result.messages == 0 and result.timeouts == 0
    assert LoadResult.merge([result]).errors == 2


async def test_no_listener_is_a_clear_load_error() -> None:
    with pytest.raises(LoadError, match="cannot connect"):
        await run_senders(spec(1, conns=1))  # port 1 on loopback: nothing listens


# --------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------


@pytest.fixture
def threaded_echo_server() -> Iterator[EchoServer]:
    """The echo server on its own event loop thread (run_load blocks the calling thread)."""
    loop = asyncio.new_event_loop()
    echo = EchoServer(aa)
    server = loop.run_until_complete(loop.create_server(echo.protocol, "127.0.0.1", 0))
    echo.port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield echo
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    server.close()
    loop.run_until_complete(server.wait_closed())
    loop.close()


def test_run_load_splits_connections_over_processes_and_merges(threaded_echo_server: EchoServer) -> None:
    observed: list[str] = []

    class Observer:
        def window_started(self) -> None:
            observed.append("start")

        def window_ended(self) -> None:
            observed.append("end")

    load = LoadSpec("127.0.0.1", threaded_echo_server.port, 4, 0.5, warmup_s=0.0, max_messages=400)
    result = run_load(load, procs=2, observer=Observer())
    assert (result.procs, result.conns, result.client) == (2, 4, "medagent")
    assert observed == ["start", "end"]
    assert result.errors == 0 and result.messages > 0
    assert result.messages <= len(threaded_echo_server.received)
    assert len(set(threaded_echo_server.received)) == len(threaded_echo_server.received)
    assert result.p50_us is not None and result.p99_us is not None and result.p50_us <= result.p99_us


# --------------------------------------------------------------------------------------------
# Report, CPU sampling, command line
# --------------------------------------------------------------------------------------------


def load_result(rate: float, client: str = "medagent") -> LoadResult:
    return LoadResult(client, 10, 1, int(rate), 1.0, rate, 100.0, 200.0, 300.0, 400.0, 0, 0, 0, 0, 50.0)


def scenario_result(target: Target, impl: str, rate: float, mode: str = "fast") -> ScenarioResult:
    scenario = Scenario(target, mode if target is Target.MEDAGENT else "echo", 10, impl, ClientKind.MEDAGENT)
    return ScenarioResult(scenario, load_result(rate), 80.0, 60.0, "")


def test_report_ratios_to_c_echo_and_to_pure_mode() -> None:
    results = [scenario_result(Target.C_ECHO, "-", 100_000.0),
               scenario_result(Target.MEDAGENT, "c", 30_000.0),
               scenario_result(Target.MEDAGENT, "py", 10_000.0)]
    by_impl = {row.result.scenario.impl: row for row in rows(results)}
    assert by_impl["-"].vs_c_echo == 1.0
    assert by_impl["c"].vs_c_echo == 0.3 and by_impl["c"].vs_py == 3.0
    assert by_impl["py"].vs_py is None
    settings = {"warmup_s": 1}
    table = format_table(results, [Failure("x", "boom")], settings)
    assert "30,000" in table and "FAILED x: boom" in table
    assert "warmup_s=1" in table  # the run's settings are printed with the table
    document = to_document(results, [], {})
    assert [r["vs_c_echo"] for r in document["results"]] == [1.0, 0.3, 0.1]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc (Linux)")
def test_process_tree_cpu_reads_proc() -> None:
    cpu = ProcessTreeCpu(os.getpid())
    cpu.window_started()
    sum(i * i for i in range(200_000))
    cpu.window_ended()
    assert cpu.tree_pct is not None and cpu.tree_pct >= 0 and cpu.root_pct is not None


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medagent")
    bench_cli.register(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


@pytest.mark.parametrize("argv", [("--modes", "fast,bogus"), ("--conns", "0"), ("--conns", "x"),
                                  ("--duration", "0"), ("--c-server", "/nonexistent/mllp_server")])
def test_cli_usage_errors_exit_2(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    args = bench_args(*argv)
    assert args.handler(args) == 2
    assert "medagent bench:" in capsys.readouterr().err


def test_cli_matrix_skips_c_client_for_two_phase() -> None:
    matrix = bench_cli.build_matrix(["fast", "two-phase"], [1, 10], ["c", "py"],
                                    [Target.MEDAGENT, Target.C_ECHO], [ClientKind.MEDAGENT, ClientKind.C])
    assert matrix[0].target is Target.C_ECHO and matrix[1].target is Target.C_ECHO
    assert not [s for s in matrix if s.mode == "two-phase" and s.client is ClientKind.C]
    assert len(matrix) == 2 * (2 + 2 * 2 + 2)  # per conns: 2 echo, fast 2x2, two-phase 2x1


def test_worker_result_round_trips() -> None:
    result = WorkerResult(conns=3, messages=5, bad_acks=1, window_s=1.5)
    result.histogram.record(1234)
    again = WorkerResult.from_dict(result.to_dict())
    assert again.to_dict() == result.to_dict()


def test_system_that_dies_at_startup_is_reported_with_its_output(tmp_path) -> None:
    from medagent.bench import harness

    command = [sys.executable, "-c", "import sys; print('config says no'); sys.exit(3)"]
    with pytest.raises(harness.SystemStartError, match="(?s)status 3.*config says no"):
        with harness._started(command, harness.free_port(), tmp_path, dict(os.environ), 20.0, "the test server"):
            pass


def test_started_system_is_stopped_on_exit(tmp_path) -> None:
    from medagent.bench import harness

    port = harness.free_port()
    listener = (f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); "
                "time.sleep(60)")
    with harness._started([sys.executable, "-c", listener], port, tmp_path, dict(os.environ), 20.0,
                          "the test server") as process:
        assert process.poll() is None
    assert process.poll() is not None
