"""End-to-end benchmark harness: start the system under test, load it, sample it, stop it.

Theory of operation
-------------------
A `Scenario` is one cell of the benchmark matrix: a target (`medagent serve`, the
independent C echo-ACK server that shows what this machine can do at all, or Medplum's own Node
HL7 stack -- fastack.mjs forwarding to sink.mjs, copied from ``--medplum-dir`` -- the peer to
beat), an ACK mode, a
number of lock-step connections, an implementation (Cython "c" or pure "py") and a client
(medagent's own `loadgen`, or the independent C client).

`run_scenario` runs one cell, always with the system under test in separate processes:

1. write a TOML config with one MLLP channel on a free loopback port in the scenario's ACK
   mode, the embedded hub on another free port and the ACK bot, in a fresh temporary data
   directory;
2. start ``python -m medagent serve --config <file>`` in its own process group, with
   ``MEDAGENT_NO_EXTENSIONS=1`` for "py"; wait until the MLLP port accepts (or the process dies:
   `SystemStartError` with the tail of its output);
3. run the load (worker processes of `loadgen`, or the C client), sampling the CPU time of the
   agent and of its whole process tree (the embedded hub is a child) from ``/proc/<pid>/stat``
   at the start and the end of the measured window (Linux only; None elsewhere); the "agent"
   figure is the `medagent serve` process (Medplum: fastack.mjs), the "hub" figure the rest
   (the embedded hub; Medplum: sink.mjs);
4. stop the process group: SIGTERM, then SIGKILL after `STOP_TIMEOUT_S`.

Invariants
----------
* Every process the harness starts is stopped before `run_scenario` returns or raises.
* The client never runs in the process of the system under test, nor in the harness's own
  process (loadgen runs in worker processes; the harness only waits and samples).
* Endpoints are MLLP on 127.0.0.1 (DESIGN.md performance targets: loopback, 625-byte ADT^A01).
* The C client runs under the scheduling policy of ``BenchSettings.client_priority`` (default
  the normal one; ``realtime``: `medagent.bench.priority`), the same for every target.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from medagent.bench import priority
from medagent.bench.loadgen import (
    ACCEPTED_CODES,
    SAMPLE_ADT_A01,
    LoadError,
    LoadResult,
    LoadSpec,
    default_procs,
    frame_template,
    run_load,
)

__all__ = [
    "MODES",
    "Target",
    "ClientKind",
    "Scenario",
    "ScenarioResult",
    "BenchSettings",
    "SystemStartError",
    "ScenarioNotApplicable",
    "ProcessTreeCpu",
    "client_supports",
    "run_scenario",
    "run",
    "system_under_test",
    "medagent_config",
]

#: ACK modes in the order the matrix runs them.
MODES: Final = ("fast", "immediate", "original", "two-phase")
STARTUP_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 30.0
OUTPUT_TAIL_LINES: Final = 20
#: The C client writes 12-character control ids over the template's MSH-10.
C_CLIENT_ID_WIDTH: Final = 12


class Target(enum.StrEnum):
    MEDAGENT = "medagent"
    C_ECHO = "c-echo"
    #: Medplum's own Node HL7 stack (fastack.mjs + sink.mjs from --medplum-dir), the peer to beat.
    MEDPLUM = "medplum"


#: Our ACK mode -> (fastack.mjs flags, sink.mjs flags) of the Medplum path it is compared with:
#: fast = Medplum's fast ACK + one websocket frame per message (nothing persisted); original =
#: the ACK comes back from the sink (a bot that stores nothing).
MEDPLUM_MODES: Final = {"fast": ((), ()), "original": (("--original",), ("--respond",))}
#: Files of the Medplum bench folder the harness copies (node_modules is linked, not copied).
MEDPLUM_FILES: Final = ("fastack.mjs", "sink.mjs", "package.json")
#: impl of medagent rows run by another interpreter (--baseline-python): an older install.
BASELINE_IMPL: Final = "base"


class ClientKind(enum.StrEnum):
    MEDAGENT = "medagent"
    C = "c"


class SystemStartError(RuntimeError):
    """The system under test did not start; the message ends with the tail of its output."""


class ScenarioNotApplicable(ValueError):
    """The scenario cannot be measured as asked (e.g. the C client in two-phase mode)."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """One cell of the matrix. For the C echo target mode is "echo" and impl is "-"."""

    target: Target
    mode: str
    conns: int
    impl: str
    client: ClientKind

    @property
    def label(self) -> str:
        return f"{self.target}/{self.mode}/{self.conns}c/{self.impl}/{self.client}-client"


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """How every scenario of a run is measured."""

    duration_s: float = 10.0
    warmup_s: float = 2.0
    max_messages: int = 50_000_000
    procs: int = 1
    c_server: Path | None = None
    c_client: Path | None = None
    message: bytes = SAMPLE_ADT_A01
    startup_timeout_s: float = STARTUP_TIMEOUT_S
    medplum_dir: Path | None = None  # the Medplum Node bench folder with node_modules installed
    baseline_python: Path | None = None  # interpreter of an older medagent install (impl "base")
    client_priority: str = priority.NORMAL  # the C client's scheduling policy (medagent.bench.priority)


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    """A measured scenario: the client's view and the system under test's CPU use."""

    scenario: Scenario
    load: LoadResult
    sut_cpu_pct: float | None  # the whole process tree (agent + embedded hub), % of one core
    agent_cpu_pct: float | None  # the `medagent serve` process alone (Medplum: fastack.mjs)
    implementation: str  # what the system under test reported (banner line), or ""
    #: the whole machine's busy CPU over the window, % of one core (all tenants: shows the noise)
    machine_cpu_pct: float | None = None

    @property
    def hub_cpu_pct(self) -> float | None:
        """The hub side: the embedded hub's processes (Medplum: the sink), % of one core."""
        if self.sut_cpu_pct is None or self.agent_cpu_pct is None:
            return None
        return round(self.sut_cpu_pct - self.agent_cpu_pct, 1)

    def _per_message_us(self, pct: float | None) -> float | None:
        # CPU seconds per wall second / messages per wall second = CPU seconds per message.
        if pct is None or self.load.rate <= 0:
            return None
        return round(pct / 100.0 / self.load.rate * 1e6, 1)

    @property
    def agent_us_per_msg(self) -> float | None:
        return self._per_message_us(self.agent_cpu_pct)

    @property
    def hub_us_per_msg(self) -> float | None:
        return self._per_message_us(self.hub_cpu_pct)

    def to_dict(self) -> dict[str, object]:
        return {
            "target": str(self.scenario.target),
            "mode": self.scenario.mode,
            "conns": self.scenario.conns,
            "impl": self.scenario.impl,
            "client": str(self.scenario.client),
            **{f"load_{k}": v for k, v in self.load.to_dict().items() if k not in ("conns",)},
            "sut_cpu_pct": self.sut_cpu_pct,
            "agent_cpu_pct": self.agent_cpu_pct,
            "hub_cpu_pct": self.hub_cpu_pct,
            "machine_cpu_pct": self.machine_cpu_pct,
            "agent_us_per_msg": self.agent_us_per_msg,
            "hub_us_per_msg": self.hub_us_per_msg,
            "implementation": self.implementation,
        }


def client_supports(client: ClientKind, mode: str) -> bool:
    """The C client checks ``MSA|AA|<id>`` only, so it cannot measure two-phase (CA) mode."""
    return client is ClientKind.MEDAGENT or ACCEPTED_CODES.get(mode) == frozenset({"AA"})


def medplum_supports(mode: str) -> bool:
    """Medplum's stack has a counterpart of our fast and original modes only."""
    return mode in MEDPLUM_MODES


# ---------------------------------------------------------------------------------------------
# CPU sampling from /proc
# ---------------------------------------------------------------------------------------------


def _read_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system CPU seconds) of `pid` from /proc/<pid>/stat, None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return int(fields[1]), ticks / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from the first line of /proc/stat, None without it."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class ProcessTreeCpu:
    """CPU time of a process and its descendants between `window_started` and `window_ended`.

    A `loadgen.WindowObserver`. On systems without /proc every figure is None. `other_roots`
    are further processes (with their descendants) that count to the tree but not to the root.
    """

    def __init__(self, root_pid: int, *other_roots: int) -> None:
        self.root_pid = root_pid
        self.other_roots = other_roots
        self.available = Path(f"/proc/{root_pid}/stat").exists()
        self._start: tuple[float, dict[int, float]] | None = None
        self._end: tuple[float, dict[int, float]] | None = None
        self._machine_start: tuple[int, int] | None = None
        self._machine_end: tuple[int, int] | None = None

    def members(self) -> list[int]:
        """The pids of the tree now (roots first)."""
        return list(self._tree())

    def _tree(self) -> dict[int, float]:
        stats: dict[int, tuple[int, float]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _read_stat(int(entry.name))) is not None:
                stats[int(entry.name)] = stat
        members, frontier = {self.root_pid, *self.other_roots}, [self.root_pid, *self.other_roots]
        while frontier:
            parent = frontier.pop()
            children = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in members]
            members.update(children)
            frontier.extend(children)
        ordered = [self.root_pid, *self.other_roots, *sorted(members - {self.root_pid, *self.other_roots})]
        return {pid: stats[pid][1] for pid in ordered if pid in stats}

    def window_started(self) -> None:
        if self.available:
            self._machine_start = _machine_busy()
            self._start = (time.monotonic(), self._tree())

    def window_ended(self) -> None:
        if self.available:
            self._end = (time.monotonic(), self._tree())
            self._machine_end = _machine_busy()

    @property
    def machine_pct(self) -> float | None:
        """Busy CPU of the whole machine over the window, % of one core (every process, not only
        the tree: other tenants of a shared machine show up here)."""
        start, end = self._machine_start, self._machine_end
        if start is None or end is None or end[1] <= start[1]:
            return None
        return round(100.0 * (end[0] - start[0]) / (end[1] - start[1]) * (os.cpu_count() or 1), 1)

    def _percent(self, pids: Sequence[int] | None) -> float | None:
        if self._start is None or self._end is None:
            return None
        (t0, before), (t1, after) = self._start, self._end
        if t1 <= t0:
            return None
        chosen = after if pids is None else {p: after[p] for p in pids if p in after}
        used = sum(cpu - before.get(pid, 0.0) for pid, cpu in chosen.items())
        return round(100.0 * used / (t1 - t0), 1)

    @property
    def tree_pct(self) -> float | None:
        return self._percent(None)

    @property
    def root_pct(self) -> float | None:
        return self._percent([self.root_pid])


# ---------------------------------------------------------------------------------------------
# Processes under test
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the system under test binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no output)"
    return "\n".join(lines[-OUTPUT_TAIL_LINES:]) or "(no output)"


def _wait_for_port(process: subprocess.Popen[bytes], port: int, timeout_s: float, output: Path,
                   what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemStartError(f"{what} exited with status {process.returncode} before listening "
                                   f"on 127.0.0.1:{port}; its output ends with:\n{_tail(output)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemStartError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s; "
                           f"its output ends with:\n{_tail(output)}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, SIGKILL after STOP_TIMEOUT_S."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)


@contextmanager
def _started(command: Sequence[str], port: int, workdir: Path, env: dict[str, str],
             timeout_s: float, what: str) -> Iterator[subprocess.Popen[bytes]]:
    output = workdir / "output.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(list(command), stdout=sink, stderr=subprocess.STDOUT, env=env,
                                   cwd=workdir, start_new_session=True)
    try:
        _wait_for_port(process, port, timeout_s, output, what)
        yield process
    finally:
        _stop(process)


def medagent_config(data_dir: Path, port: int, mode: str, hub_port: int,
                    agent_options: Mapping[str, int | float | str | bool] | None = None) -> str:
    """The TOML of a one-channel `medagent serve` with the embedded hub and the ACK bot;
    `agent_options` are further [agent] keys (e.g. the soak's retention_max_mb)."""
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in (agent_options or {}).items())
    return (
        f"[agent]\ndata_dir = {json.dumps(str(data_dir))}\nhub = \"embedded\"\nlog_level = \"WARNING\"\n{extra}\n"
        f"[hub]\nport = {hub_port}\n\n"
        f"[[channel]]\nname = \"bench\"\nendpoint = \"mllp://127.0.0.1:{port}?ackMode={mode}\"\n"
        f"bot = \"medagent.hub.bots.ack:handler\"\n"
    )


def _medagent_env(impl: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MEDAGENT_NO_EXTENSIONS", None)
    if impl == "py":
        env["MEDAGENT_NO_EXTENSIONS"] = "1"
    return env


def _implementation_line(workdir: Path) -> str:
    try:
        for line in (workdir / "output.log").read_text(errors="replace").splitlines():
            if "extensions:" in line:
                return line.strip()
    except OSError:
        pass
    return ""


def _medplum_copy(settings: BenchSettings, workdir: Path) -> Path:
    """The Medplum bench folder copied into `workdir` (its node_modules linked): the source may be
    read-only, and the servers run with the copy as their working directory."""
    source = settings.medplum_dir
    if source is None or not (source / "fastack.mjs").is_file() or not (source / "node_modules").is_dir():
        raise ScenarioNotApplicable("Medplum rows need --medplum-dir: a folder with fastack.mjs, sink.mjs "
                                    "and node_modules (npm ci --no-audit --no-fund; node >= 20)")
    copy = workdir / "medplum"
    copy.mkdir()
    for name in MEDPLUM_FILES:
        shutil.copy2(source / name, copy / name)
    (copy / "node_modules").symlink_to((source / "node_modules").resolve(), target_is_directory=True)
    return copy


@contextmanager
def _medplum(scenario: Scenario, settings: BenchSettings, workdir: Path
             ) -> Iterator[tuple[subprocess.Popen[bytes], int, ProcessTreeCpu]]:
    """fastack.mjs (the agent's side) and, in front of it, sink.mjs (the cloud's side)."""
    folder = _medplum_copy(settings, workdir)
    agent_flags, sink_flags = MEDPLUM_MODES[scenario.mode]
    bound = str(int(settings.warmup_s + settings.duration_s + 120))  # both exit by themselves after
    sink_port, port = free_port(), free_port()
    sink_dir, agent_dir = workdir / "sink", workdir / "fastack"
    sink_dir.mkdir()
    agent_dir.mkdir()
    sink_cmd = ["node", str(folder / "sink.mjs"), "--port", str(sink_port), "--max-seconds", bound, *sink_flags]
    agent_cmd = ["node", str(folder / "fastack.mjs"), "--port", str(port), "--sink",
                 f"ws://127.0.0.1:{sink_port}", "--max-seconds", bound, *agent_flags]
    with _started(sink_cmd, sink_port, sink_dir, dict(os.environ), settings.startup_timeout_s,
                  "Medplum sink.mjs") as sink, \
            _started(agent_cmd, port, agent_dir, dict(os.environ), settings.startup_timeout_s,
                     "Medplum fastack.mjs") as agent:
        yield agent, port, ProcessTreeCpu(agent.pid, sink.pid)


@contextmanager
def system_under_test(scenario: Scenario, settings: BenchSettings, workdir: Path,
                      agent_options: Mapping[str, int | float | str | bool] | None = None
                      ) -> Iterator[tuple[subprocess.Popen[bytes], int, ProcessTreeCpu]]:
    """Start the scenario's target in `workdir` (medagent's data directory: ``workdir/data``),
    yield (process, its MLLP port, a CPU observer of its processes), stop it on exit."""
    if scenario.target is Target.MEDPLUM:
        with _medplum(scenario, settings, workdir) as started:
            yield started
        return
    port = free_port()
    if scenario.target is Target.C_ECHO:
        if settings.c_server is None or not settings.c_server.is_file():
            raise ScenarioNotApplicable("the C echo server is not built (give --c-server PATH; "
                                        "it is built from medagent/bench/tools/ when a C compiler exists)")
        bound = int(settings.warmup_s + settings.duration_s + 120)
        command = [str(settings.c_server), str(port), str(bound)]
        with _started(command, port, workdir, dict(os.environ), settings.startup_timeout_s,
                      "the C echo server") as process:
            yield process, port, ProcessTreeCpu(process.pid)
        return
    config = workdir / "medagent.toml"
    config.write_text(medagent_config(workdir / "data", port, scenario.mode, free_port(), agent_options))
    python = sys.executable
    if scenario.impl == BASELINE_IMPL:
        if settings.baseline_python is None:
            raise ScenarioNotApplicable("baseline rows need --baseline-python")
        python = str(settings.baseline_python)
    command = [python, "-P", "-m", "medagent", "serve", "--config", str(config)]
    with _started(command, port, workdir, _medagent_env(scenario.impl), settings.startup_timeout_s,
                  "medagent serve") as process:
        yield process, port, ProcessTreeCpu(process.pid)


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


def _load_spec(scenario: Scenario, port: int, settings: BenchSettings) -> LoadSpec:
    mode = scenario.mode if scenario.target is Target.MEDAGENT else "fast"  # the others answer AA
    return LoadSpec.for_mode(mode, "127.0.0.1", port, scenario.conns, settings.duration_s,
                             warmup_s=settings.warmup_s, max_messages=settings.max_messages,
                             message=settings.message)


def _run_c_client(scenario: Scenario, port: int, settings: BenchSettings, workdir: Path,
                  observer: ProcessTreeCpu) -> LoadResult:
    if settings.c_client is None or not settings.c_client.is_file():
        raise ScenarioNotApplicable("the C load client is not built (give --c-client PATH; "
                                    "it is built from medagent/bench/tools/ when a C compiler exists)")
    head, tail, width = frame_template(settings.message)
    if width != C_CLIENT_ID_WIDTH:
        raise ScenarioNotApplicable(f"the C client needs a 12-character MSH-10 in the message, not {width}")
    message_file = workdir / "msg.bin"
    message_file.write_bytes(head + b"0" * width + tail)
    command = [str(settings.c_client), str(port), str(scenario.conns), str(settings.duration_s),
               str(settings.warmup_s), str(settings.max_messages), str(message_file), str(len(head))]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir)
    try:
        try:
            priority.apply(process.pid, settings.client_priority)  # before the warm-up ends
        except priority.PriorityError as exc:
            raise LoadError(str(exc)) from None
        time.sleep(settings.warmup_s)
        observer.window_started()
        time.sleep(settings.duration_s)
        observer.window_ended()
        out, err = process.communicate(timeout=settings.duration_s + settings.warmup_s + 60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    lines = out.decode(errors="replace").strip().splitlines()
    if process.returncode not in (0, 3) or not lines:  # 3 = finished with bad ACKs
        raise LoadError(f"the C client failed (status {process.returncode}): "
                        f"{err.decode(errors='replace').strip()[-500:]}")
    data = json.loads(lines[-1])
    return LoadResult(client="c", conns=int(data["conns"]), procs=1, messages=int(data["msgs"]),
                      seconds=float(data["secs"]), rate=float(data["rate"]),
                      p50_us=float(data["p50_us"]), p99_us=float(data["p99_us"]),
                      # (absent from an older client given with --c-client)
                      p999_us=_optional_float(data, "p999_us"), max_us=_optional_float(data, "max_us"),
                      bad_acks=int(data["bad_acks"]), timeouts=0, disconnects=0,
                      late_acks=0, cpu_pct=float(data["cpu_pct"]),
                      slow_time_pct=_optional_float(data, "slow_time_pct"))


def _optional_float(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    return None if value is None else float(value)


def _run_client(scenario: Scenario, port: int, settings: BenchSettings, workdir: Path,
                observer: ProcessTreeCpu) -> LoadResult:
    if scenario.client is ClientKind.C:
        return _run_c_client(scenario, port, settings, workdir, observer)
    return run_load(_load_spec(scenario, port, settings), procs=settings.procs, observer=observer)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run(scenario: Scenario, settings: BenchSettings) -> ScenarioResult:
    """Measure one scenario (see the module docstring). Raises SystemStartError, LoadError,
    ScenarioNotApplicable."""
    if not client_supports(scenario.client, scenario.mode if scenario.target is Target.MEDAGENT else "fast"):
        raise ScenarioNotApplicable(f"the C client cannot check {scenario.mode} ACKs (it expects AA)")
    if scenario.target is Target.MEDPLUM and not medplum_supports(scenario.mode):
        raise ScenarioNotApplicable(f"Medplum's stack has no {scenario.mode} mode (only fast, original)")
    with tempfile.TemporaryDirectory(prefix="medagent-bench-") as tmp:
        workdir = Path(tmp)
        with system_under_test(scenario, settings, workdir) as (_process, port, cpu):
            load = _run_client(scenario, port, settings, workdir, cpu)
            implementation = _implementation_line(workdir)
    if load.messages == 0:
        raise LoadError(f"no ACK arrived in the measured window ({load.errors} errors: "
                        f"{load.bad_acks} bad ACKs, {load.timeouts} timeouts, {load.disconnects} "
                        f"disconnects, {load.unanswered} unanswered at the end)")
    return ScenarioResult(scenario, load, cpu.tree_pct, cpu.root_pct, implementation, cpu.machine_pct)


def run_scenario(mode: str, conns: int, duration: float, impl: str = "c", *,
                 warmup: float = 2.0, target: Target | str = Target.MEDAGENT,
                 client: ClientKind | str = ClientKind.MEDAGENT, procs: int | None = None,
                 max_messages: int = 50_000_000, c_server: Path | None = None,
                 c_client: Path | None = None) -> ScenarioResult:
    """Start the system under test, run `conns` lock-step senders for `duration` s, stop it.

    `mode` is the channel's ACK mode (fast|immediate|original|two-phase), `impl` "c" or "py"
    (``MEDAGENT_NO_EXTENSIONS=1`` in the agent's environment), `target` medagent or c-echo
    (the C echo server at `c_server`), `client` medagent (loadgen in `procs` worker processes)
    or c (the C client at `c_client`).
    """
    if mode not in MODES:
        raise ValueError(f"unknown ACK mode {mode!r}; choose from {', '.join(MODES)}")
    if impl not in ("c", "py"):
        raise ValueError(f"impl must be 'c' or 'py', not {impl!r}")
    target = Target(target)
    scenario = Scenario(target, mode if target is Target.MEDAGENT else "echo", conns,
                        impl if target is Target.MEDAGENT else "-", ClientKind(client))
    settings = BenchSettings(duration_s=duration, warmup_s=warmup, max_messages=max_messages,
                             procs=default_procs() if procs is None else procs,
                             c_server=c_server, c_client=c_client)
    return run(scenario, settings)
