"""Round trip and throughput of the agent<->hub link itself, with and without batching.

What is measured
----------------
The real :class:`medagent.cloud.link.AgentLink` runs in this process (on uvloop by default)
against the real hub, ``python -m medagent hub serve``, started as a **separate process** with a
fresh data directory per scenario. Before the hub starts, ``medagent hub add-agent NAME --json``
registers the agent and ``medagent hub add-channel`` gives it the channel ``adt-in`` with the
ACK bot (``medagent.hub.bots.ack:handler``), so every message is stored by the hub, run through
the bot (HL7 header scan + ACK build: the Cython kernels, or their pure twins with
``MEDAGENT_NO_EXTENSIONS=1`` in the hub's environment) and answered with
``agent:transmit:response``. No MLLP socket and no agent queue are involved: this is the link
and the hub alone.

Every message is an ``agent:transmit:request`` for channel ``adt-in`` whose body is the 625-byte
ADT^A01 of the performance targets (``tests/data/adt_a01.hl7`` decoded as latin-1) with a
unique MSH-10 of the template's length (HL7 v2.x ch. 2.14.9.10) and a unique callback. The
probe (:class:`LinkProbe`, the :class:`~medagent.cloud.link.LinkHandler`) stamps
``time.perf_counter_ns()`` at ``send_transmit`` and in every callback: ``on_transmit_response``
gives the round trip (RTT: send -> the bot's reply), ``on_confirmed`` the confirmation latency
(send -> ``agent:batch:ack`` in batch mode, -> the reply itself in plain mode). A reply must
carry ``MSA|AA|`` and the status must be 200 (or absent), else it counts as an error.

Two load shapes, each with ``LinkSettings.use_batching`` on and off:

* ``window`` (W = 1, 10, 100): W messages in flight; each reply immediately sends the next
  message from inside ``on_transmit_response`` (lock-step per slot). After ``warmup_s`` the
  replies of ``duration_s`` seconds are counted: msg/s and RTT p50/p99.
* ``flood`` (N = 50,000): N messages are built first, then handed to ``send_transmit`` as fast
  as it accepts them, ``flood_chunk`` per event-loop iteration (0 = all in one go). msg/s is N
  over the time from the first send until every reply **and** every confirmation arrived.

Bounds: every scenario has a message budget (``max_messages``), a wall-clock bound (warm-up +
duration + drain, or ``flood_timeout_s``), a bound on reaching the live state and on the hub's
start; the hub is always stopped (SIGTERM, SIGKILL after 10 s) and on Linux dies with us.

Use: ``python benchmarks/link_roundtrip.py [--json] [--impl c|py|both] ...`` (``--help``), or
import :func:`run_scenario` / :func:`run_matrix`. docs/benchmarks.md, "Link round trip", has the
commands and figures. The link sends no message bodies to logs; neither does this script.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medagent import _compat
from medagent.bench.harness import ProcessTreeCpu
from medagent.bench.report import machine_info
from medagent.cloud import messages as m
from medagent.cloud.link import AgentLink, LinkSettings

__all__ = [
    "DEFAULT_FLOOD",
    "DEFAULT_WINDOWS",
    "HubProcess",
    "HubStartError",
    "LinkProbe",
    "MessageFactory",
    "RunLimits",
    "Scenario",
    "ScenarioResult",
    "Shape",
    "format_table",
    "main",
    "run_matrix",
    "run_scenario",
    "scenarios",
    "to_document",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_MESSAGE = REPO_ROOT / "tests" / "data" / "adt_a01.hl7"
AGENT_NAME = "link-bench"
CHANNEL = "adt-in"
CHANNEL_ADDRESS = "mllp://127.0.0.1:2575"
ACK_BOT = "medagent.hub.bots.ack:handler"
#: The ``remote`` of every transmit (an MLLP sender's address in real use).
REMOTE = "127.0.0.1:49152"
DEFAULT_WINDOWS = (1, 10, 100)
DEFAULT_FLOOD = 50_000

HUB_START_TIMEOUT_S = 30.0
HUB_STOP_TIMEOUT_S = 10.0
PROVISION_TIMEOUT_S = 60.0
LIVE_TIMEOUT_S = 15.0
#: After the measured window, in-flight replies may take this long before the run is failed.
DRAIN_TIMEOUT_S = 15.0
_LISTENING = re.compile(rb"medagent hub listening on (\S+)")
_ACK_OK = "MSA|AA|"


class Shape(enum.StrEnum):
    WINDOW = "window"
    FLOOD = "flood"


class Impl(enum.StrEnum):
    """Which HL7 kernels the hub's bot uses (the link itself has no Cython twin)."""

    C = "c"
    PY = "py"


class HubStartError(RuntimeError):
    """The hub could not be provisioned or started; the message ends with its output's tail."""


class ScenarioFailed(RuntimeError):
    """The link went down, never came up, or the replies did not arrive in time."""


@dataclass(frozen=True, slots=True)
class Scenario:
    shape: Shape
    size: int  # W (messages in flight) for a window, N (messages) for a flood
    batching: bool
    impl: Impl

    @property
    def label(self) -> str:
        size = f"W={self.size}" if self.shape is Shape.WINDOW else f"N={self.size}"
        return f"{self.impl} {'batch' if self.batching else 'plain'} {self.shape} {size}"


@dataclass(frozen=True, slots=True)
class RunLimits:
    """Bounds and knobs shared by all scenarios of a run."""

    duration_s: float = 5.0
    warmup_s: float = 1.0
    max_messages: int = 2_000_000
    flood_chunk: int = 1000
    flood_timeout_s: float = 120.0
    loop: str = "uvloop"

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.warmup_s < 0 or self.flood_timeout_s <= 0:
            raise ValueError("duration and flood timeout must be > 0 and warm-up >= 0 seconds")
        if self.max_messages < 1 or self.flood_chunk < 0:
            raise ValueError("max_messages must be >= 1 and flood_chunk >= 0")
        if self.loop not in ("uvloop", "asyncio"):
            raise ValueError(f"loop must be 'uvloop' or 'asyncio', not {self.loop!r}")


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    scenario: Scenario
    messages: int = 0  # replies counted (window: in the measured window; flood: N)
    seconds: float = 0.0  # measured wall time
    msgs_per_s: float = 0.0
    rtt_p50_us: float | None = None
    rtt_p99_us: float | None = None
    rtt_max_us: float | None = None
    confirm_p50_us: float | None = None
    confirm_p99_us: float | None = None
    send_phase_s: float | None = None  # flood: time to hand all N to send_transmit
    errors: int = 0  # bad replies + hub agent:error for a transmit + unknown callbacks
    agent_cpu_pct: float | None = None
    hub_cpu_pct: float | None = None
    agent_cpu_us_per_msg: float | None = None  # agent (this process) CPU time per message
    hub_cpu_us_per_msg: float | None = None  # hub process CPU time per message
    link: Mapping[str, Any] = field(default_factory=dict)  # frame counters from AgentLink.stats()
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scenario"] = {**asdict(self.scenario), "label": self.scenario.label}
        data["link"] = dict(self.link)
        return data


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


class MessageFactory:
    """Transmit requests with a unique MSH-10 (same length as the template's) and callback."""

    def __init__(self, template: str, agent_id: str, run_tag: str) -> None:
        msh_end = template.find("\r")
        msh = template if msh_end < 0 else template[:msh_end]
        fields = msh.split("|")
        if not msh.startswith("MSH|") or len(fields) < 10 or not fields[9]:
            raise ValueError("the template message needs an MSH segment with an MSH-10")
        start = len("|".join(fields[:9])) + 1
        width = len(fields[9])
        self._before = template[:start]
        self._after = template[start + width :]
        self._digits = max(width - 1, 1)
        self._callback_prefix = f"Agent/{agent_id}-{run_tag}-"
        self.made = 0

    def next(self) -> m.TransmitRequest:
        self.made += 1
        number = self.made
        return m.TransmitRequest(
            remote=REMOTE,
            content_type=m.CONTENT_TYPE_HL7_V2,
            body=f"{self._before}L{number:0{self._digits}d}{self._after}",
            channel=CHANNEL,
            callback=f"{self._callback_prefix}{number}",
        )


def load_template(path: Path = CORPUS_MESSAGE) -> str:
    return path.read_bytes().decode("latin-1")


# ---------------------------------------------------------------------------------------------
# The LinkHandler that records times
# ---------------------------------------------------------------------------------------------


def _percentile_us(sorted_ns: Sequence[int], fraction: float) -> float | None:
    """Nearest-rank percentile of sorted nanoseconds, in microseconds."""
    if not sorted_ns:
        return None
    index = min(len(sorted_ns) - 1, max(0, math.ceil(fraction * len(sorted_ns)) - 1))
    return round(sorted_ns[index] / 1000.0, 1)


class LinkProbe:
    """A :class:`~medagent.cloud.link.LinkHandler` stamping every callback with perf_counter_ns.

    ``sent`` must be called right before ``send_transmit``. While ``recording`` is on, reply and
    confirmation latencies are kept; counters always run. ``on_reply`` (if set) is called after
    each expected reply (the window driver sends the next message from there).
    """

    def __init__(self) -> None:
        self.live = asyncio.Event()
        self.down = asyncio.Event()
        self.complete = asyncio.Event()
        self.down_reason: str | None = None
        self.closing = False
        self.features: Mapping[str, Any] = {}
        self.recording = False
        self.rtt_ns: list[int] = []
        self.confirm_ns: list[int] = []
        self.replies = 0
        self.replies_recorded = 0
        self.confirmed = 0
        self.errors = 0
        self.last_reply_ns = 0
        self.last_confirm_ns = 0
        self.on_reply: Callable[[], None] | None = None
        self._target: int | None = None
        self._unanswered: dict[str, int] = {}
        self._unconfirmed: dict[str, int] = {}

    # -- driver side --------------------------------------------------------------------------
    def sent(self, callback: str, now_ns: int) -> None:
        self._unanswered[callback] = now_ns
        self._unconfirmed[callback] = now_ns

    def expect(self, replies_and_confirmations: int) -> None:
        """Set ``complete`` once that many replies and confirmations have arrived."""
        self._target = replies_and_confirmations
        self._check_complete()

    @property
    def in_flight(self) -> int:
        return len(self._unanswered)

    @property
    def unconfirmed(self) -> int:
        return len(self._unconfirmed)

    def _check_complete(self) -> None:
        target = self._target
        if target is not None and self.replies >= target and self.confirmed >= target:
            self.complete.set()

    # -- LinkHandler --------------------------------------------------------------------------
    def on_live(self, features: Mapping[str, Any]) -> None:
        self.features = dict(features)
        self.live.set()

    def on_down(self, reason: str) -> None:
        if not self.closing:
            self.down_reason = reason
            self.down.set()

    def on_confirmed(self, callbacks: Sequence[str]) -> None:
        now = time.perf_counter_ns()
        unconfirmed = self._unconfirmed
        recording = self.recording
        for callback in callbacks:
            sent_at = unconfirmed.pop(callback, None)
            if sent_at is None:
                continue
            self.confirmed += 1
            if recording:
                self.confirm_ns.append(now - sent_at)
        self.last_confirm_ns = now
        self._check_complete()

    def on_transmit_response(self, message: m.TransmitResponse) -> None:
        now = time.perf_counter_ns()
        sent_at = self._unanswered.pop(message.callback, None)  # type: ignore[arg-type]
        if sent_at is None:
            self.errors += 1  # a reply nobody asked for (or a second one)
            return
        if message.status_code not in (None, 200) or _ACK_OK not in message.body:
            self.errors += 1
        self.replies += 1
        self.last_reply_ns = now
        if self.recording:
            self.rtt_ns.append(now - sent_at)
            self.replies_recorded += 1
        if self.on_reply is not None:
            self.on_reply()
        self._check_complete()

    def on_transmit_error(self, callback: str, reason: str) -> None:
        self.errors += 1

    async def on_request(self, message: m.AgentMessage) -> m.AgentMessage | None:
        return None


# ---------------------------------------------------------------------------------------------
# The hub process
# ---------------------------------------------------------------------------------------------


def _hub_env(impl: Impl) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MEDAGENT_NO_EXTENSIONS", None)
    if impl is Impl.PY:
        env["MEDAGENT_NO_EXTENSIONS"] = "1"
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the hub gets SIGTERM if this script dies, even by kill -9."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no output)"
    return "\n".join(text[-lines:]) or "(no output)"


class HubProcess:
    """``medagent hub serve`` on a free loopback port with one agent and the ``adt-in`` channel.

    A context manager: provisions ``workdir/hub``, starts the hub, waits for its "listening on"
    line, and on exit stops it (SIGTERM to its pid, SIGKILL after ``HUB_STOP_TIMEOUT_S``).
    """

    def __init__(self, workdir: Path, impl: Impl) -> None:
        self.data_dir = workdir / "hub"
        self.output = workdir / "hub.log"
        self.env = _hub_env(impl)
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.credentials: dict[str, str] = {}

    def _cli(self, *args: str) -> dict[str, Any]:
        command = [sys.executable, "-P", "-m", "medagent", "hub", *args, "--data-dir", str(self.data_dir),
                   "--json"]
        done = subprocess.run(command, capture_output=True, env=self.env, timeout=PROVISION_TIMEOUT_S)
        if done.returncode != 0:
            raise HubStartError(f"`medagent hub {args[0]}` failed with status {done.returncode}: "
                                f"{done.stderr.decode(errors='replace').strip()}")
        return json.loads(done.stdout)

    def _provision(self) -> None:
        self.credentials = self._cli("add-agent", AGENT_NAME)
        self._cli("add-channel", AGENT_NAME, CHANNEL, CHANNEL_ADDRESS, "--bot", ACK_BOT)

    def _wait_listening(self) -> str:
        assert self.process is not None
        deadline = time.monotonic() + HUB_START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = _LISTENING.search(self.output.read_bytes()) if self.output.exists() else None
            if found:
                return found.group(1).decode()
            if self.process.poll() is not None:
                raise HubStartError(f"the hub exited with status {self.process.returncode}:\n"
                                    f"{_tail(self.output)}")
            time.sleep(0.05)
        raise HubStartError(f"the hub did not listen within {HUB_START_TIMEOUT_S:.0f} s:\n"
                            f"{_tail(self.output)}")

    def serve_command(self) -> list[str]:
        return [sys.executable, "-P", "-m", "medagent", "hub", "serve", "--data-dir", str(self.data_dir),
                "--host", "127.0.0.1", "--port", "0"]

    def __enter__(self) -> HubProcess:
        self._provision()
        with self.output.open("wb") as sink:
            self.process = subprocess.Popen(
                self.serve_command(), stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        try:
            self.base_url = self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(HUB_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(HUB_STOP_TIMEOUT_S)

    def link_settings(self, batching: bool) -> LinkSettings:
        return LinkSettings(
            base_url=self.base_url,
            client_id=self.credentials["client_id"],
            client_secret=self.credentials["client_secret"],
            agent_id=self.credentials["agent_id"],
            use_batching=batching,
        )


# ---------------------------------------------------------------------------------------------
# Load shapes
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Measurement:
    messages: int
    seconds: float
    send_phase_s: float | None = None
    agent_cpu_s: float = 0.0


async def _until(probe: LinkProbe, event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for ``event``; False on timeout. Raises ScenarioFailed if the link went down."""
    waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(probe.down.wait())}
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    if probe.down.is_set():
        raise ScenarioFailed(f"the link went down: {probe.down_reason}")
    return event.is_set()


def _sender(link: AgentLink, probe: LinkProbe, factory: MessageFactory) -> Callable[[], None]:
    def send_one() -> None:
        message = factory.next()
        probe.sent(message.callback, time.perf_counter_ns())  # type: ignore[arg-type]
        if not link.send_transmit(message):
            raise ScenarioFailed("send_transmit refused a message: the link is not live")

    return send_one


async def _run_window(link: AgentLink, probe: LinkProbe, factory: MessageFactory, window: int,
                      limits: RunLimits, hub_cpu: ProcessTreeCpu) -> _Measurement:
    send_one = _sender(link, probe, factory)
    budget_spent = asyncio.Event()

    def next_in_slot() -> None:
        if stopping:
            return
        if factory.made >= limits.max_messages:
            budget_spent.set()
            return
        send_one()

    stopping = False
    probe.on_reply = next_in_slot
    for _ in range(min(window, limits.max_messages)):
        send_one()
    await _until(probe, budget_spent, limits.warmup_s)

    probe.recording = True
    hub_cpu.window_started()
    cpu0, t0 = time.process_time(), time.perf_counter()
    await _until(probe, budget_spent, limits.duration_s)
    probe.recording = False
    t1, cpu1 = time.perf_counter(), time.process_time()
    hub_cpu.window_ended()
    stopping = True

    drained = asyncio.Event()
    probe.on_reply = lambda: drained.set() if probe.in_flight == 0 else None
    if probe.in_flight and not await _until(probe, drained, DRAIN_TIMEOUT_S):
        raise ScenarioFailed(f"{probe.in_flight} replies still missing {DRAIN_TIMEOUT_S:.0f} s "
                             "after the measured window")
    return _Measurement(probe.replies_recorded, t1 - t0, agent_cpu_s=cpu1 - cpu0)


async def _run_flood(link: AgentLink, probe: LinkProbe, factory: MessageFactory, count: int,
                     limits: RunLimits, hub_cpu: ProcessTreeCpu) -> _Measurement:
    count = min(count, limits.max_messages)
    messages = [factory.next() for _ in range(count)]
    chunk = limits.flood_chunk or count
    probe.expect(count)
    probe.recording = True
    hub_cpu.window_started()
    cpu0, start = time.process_time(), time.perf_counter_ns()
    for first in range(0, count, chunk):
        for message in messages[first : first + chunk]:
            probe.sent(message.callback, time.perf_counter_ns())  # type: ignore[arg-type]
            if not link.send_transmit(message):
                raise ScenarioFailed("send_transmit refused a message: the link is not live")
        await asyncio.sleep(0)
    sent_ns = time.perf_counter_ns()
    if not await _until(probe, probe.complete, limits.flood_timeout_s):
        raise ScenarioFailed(f"after {limits.flood_timeout_s:.0f} s only {probe.replies} of {count} "
                             f"replies and {probe.confirmed} confirmations had arrived")
    cpu1 = time.process_time()
    hub_cpu.window_ended()
    probe.recording = False
    end = max(probe.last_reply_ns, probe.last_confirm_ns)
    return _Measurement(count, (end - start) / 1e9, send_phase_s=(sent_ns - start) / 1e9,
                        agent_cpu_s=cpu1 - cpu0)


_LINK_COUNTERS = ("frames_sent", "frames_received", "messages_sent", "messages_received",
                  "batches_sent", "confirmed", "connects")


async def _drive(scenario: Scenario, hub: HubProcess, limits: RunLimits, template: str
                 ) -> ScenarioResult:
    assert hub.process is not None
    probe = LinkProbe()
    link = AgentLink(hub.link_settings(scenario.batching), probe)
    factory = MessageFactory(template, hub.credentials["agent_id"], f"{os.getpid()}")
    hub_cpu = ProcessTreeCpu(hub.process.pid)
    await link.start()
    try:
        if not await _until(probe, probe.live, LIVE_TIMEOUT_S):
            raise ScenarioFailed(f"the link was not live within {LIVE_TIMEOUT_S:.0f} s "
                                 f"(last error: {link.last_error})")
        batching_active = bool(link.stats()["batching"])
        if batching_active != scenario.batching:
            raise ScenarioFailed(f"asked for batching={scenario.batching}, the link runs "
                                 f"batching={batching_active} (hub features: {sorted(probe.features)})")
        run = _run_window if scenario.shape is Shape.WINDOW else _run_flood
        measured = await run(link, probe, factory, scenario.size, limits, hub_cpu)
        stats = link.stats()
    finally:
        probe.closing = True
        await link.close()
    rtt, confirm = sorted(probe.rtt_ns), sorted(probe.confirm_ns)
    seconds = measured.seconds
    agent_pct = round(100.0 * measured.agent_cpu_s / seconds, 1) if seconds > 0 else None
    hub_pct = hub_cpu.root_pct
    return ScenarioResult(
        scenario=scenario,
        messages=measured.messages,
        seconds=round(seconds, 4),
        msgs_per_s=round(measured.messages / seconds, 1) if seconds > 0 else 0.0,
        rtt_p50_us=_percentile_us(rtt, 0.50),
        rtt_p99_us=_percentile_us(rtt, 0.99),
        rtt_max_us=_percentile_us(rtt, 1.0),
        confirm_p50_us=_percentile_us(confirm, 0.50),
        confirm_p99_us=_percentile_us(confirm, 0.99),
        send_phase_s=None if measured.send_phase_s is None else round(measured.send_phase_s, 4),
        errors=probe.errors,
        agent_cpu_pct=agent_pct,
        hub_cpu_pct=hub_pct,
        agent_cpu_us_per_msg=_us_per_message(agent_pct, measured.messages, seconds),
        hub_cpu_us_per_msg=_us_per_message(hub_pct, measured.messages, seconds),
        link={key: stats[key] for key in _LINK_COUNTERS},
    )


def _us_per_message(cpu_pct: float | None, messages: int, seconds: float) -> float | None:
    if cpu_pct is None or messages == 0:
        return None
    return round(cpu_pct / 100.0 * seconds / messages * 1e6, 1)


def _run_loop(coro: Any, loop: str) -> Any:
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def run_scenario(scenario: Scenario, limits: RunLimits = RunLimits(), *,
                 template: str | None = None) -> ScenarioResult:
    """Start a fresh hub, run one scenario against it, stop the hub. Never raises for a failed
    run: the result's ``error`` says what went wrong (with the hub output's tail if it did not start).
    """
    text = load_template() if template is None else template
    with tempfile.TemporaryDirectory(prefix="medagent-linkbench-") as tmp:
        workdir = Path(tmp)
        try:
            with HubProcess(workdir, scenario.impl) as hub:
                return _run_loop(_drive(scenario, hub, limits, text), limits.loop)
        except (HubStartError, ScenarioFailed, OSError, subprocess.SubprocessError) as exc:
            return ScenarioResult(scenario=scenario, error=f"{type(exc).__name__}: {exc}")


def scenarios(impls: Sequence[Impl], batching: Sequence[bool], windows: Sequence[int],
              flood: int) -> list[Scenario]:
    """The matrix in run order: per implementation, per batching mode, windows then the flood."""
    matrix = []
    for impl in impls:
        for batch in batching:
            matrix += [Scenario(Shape.WINDOW, w, batch, impl) for w in windows]
            if flood > 0:
                matrix.append(Scenario(Shape.FLOOD, flood, batch, impl))
    return matrix


def run_matrix(matrix: Sequence[Scenario], limits: RunLimits = RunLimits(),
               progress: Callable[[ScenarioResult], None] | None = None) -> list[ScenarioResult]:
    template = load_template()
    results = []
    for scenario in matrix:
        result = run_scenario(scenario, limits, template=template)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

_COLUMNS = ("hub impl", "link", "shape", "msg/s", "RTT p50 µs", "RTT p99 µs", "conf p50 µs",
            "conf p99 µs", "msgs/frame", "agent CPU%", "hub CPU%", "agent µs/msg", "hub µs/msg",
            "errors")


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _row(result: ScenarioResult) -> tuple[str, ...]:
    s = result.scenario
    shape = f"{s.shape} {'W' if s.shape is Shape.WINDOW else 'N'}={s.size}"
    head = (str(s.impl), "batch" if s.batching else "plain", shape)
    if result.error is not None:
        return (*head, "FAILED", *[""] * (len(_COLUMNS) - 4))
    frames = result.link.get("frames_sent") or 0
    per_frame = result.link.get("messages_sent", 0) / frames if frames else None
    return (*head, _fmt(result.msgs_per_s), _fmt(result.rtt_p50_us), _fmt(result.rtt_p99_us),
            _fmt(result.confirm_p50_us), _fmt(result.confirm_p99_us), _fmt(per_frame, 1),
            _fmt(result.agent_cpu_pct), _fmt(result.hub_cpu_pct),
            _fmt(result.agent_cpu_us_per_msg, 1), _fmt(result.hub_cpu_us_per_msg, 1), str(result.errors))


def format_table(results: Sequence[ScenarioResult]) -> str:
    rows = [_COLUMNS, *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w)
                       in enumerate(zip(row, widths))) for row in rows]
    lines += [f"FAILED {r.scenario.label}: {r.error}" for r in results if r.error is not None]
    lines.append("RTT = send_transmit -> agent:transmit:response; conf = send_transmit -> on_confirmed "
                 "(agent:batch:ack in batch mode, the reply in plain mode); CPU% of one core and CPU µs "
                 "per message over the measured time; msgs/frame = transmits per agent->hub frame (frames include heartbeats)")
    return "\n".join(lines)


def to_document(results: Sequence[ScenarioResult], limits: RunLimits) -> dict[str, Any]:
    return {
        "benchmark": "link_roundtrip",
        "machine": machine_info(),
        "agent_extensions_active": _compat.EXTENSIONS_ACTIVE,
        "settings": asdict(limits),
        "results": [r.to_dict() for r in results],
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("window sizes must be >= 1")
    return values


_DEFAULTS = RunLimits()


def _parser() -> argparse.ArgumentParser:
    default_impl = "py" if _compat.NO_EXTENSIONS else "c"
    parser = argparse.ArgumentParser(
        prog="link_roundtrip",
        description="Round trip (p50/p99) and throughput of AgentLink against a real hub process, "
                    "with and without agent:batch.")
    parser.add_argument("--impl", choices=("c", "py", "both"), default=default_impl,
                        help="HL7 kernels in the hub: c, py (MEDAGENT_NO_EXTENSIONS=1) or both "
                             f"(default {default_impl}, from this process's environment)")
    parser.add_argument("--batching", choices=("on", "off", "both"), default="both",
                        help="LinkSettings.use_batching (default both)")
    parser.add_argument("--windows", type=_int_list, default=list(DEFAULT_WINDOWS),
                        help="messages in flight for the lock-step shape (default 1,10,100; '' = none)")
    parser.add_argument("--flood", type=int, default=DEFAULT_FLOOD,
                        help=f"messages in the flood shape (default {DEFAULT_FLOOD:,}; 0 = skip)")
    parser.add_argument("--flood-chunk", type=int, default=_DEFAULTS.flood_chunk,
                        help="send_transmit calls per loop iteration in the flood (0 = all at once)")
    parser.add_argument("--duration", type=float, default=_DEFAULTS.duration_s,
                        help="measured seconds per window scenario (default 5)")
    parser.add_argument("--warmup", type=float, default=_DEFAULTS.warmup_s,
                        help="unmeasured seconds before it (default 1)")
    parser.add_argument("--max-messages", type=int, default=_DEFAULTS.max_messages,
                        help="message budget per scenario, warm-up included")
    parser.add_argument("--flood-timeout", type=float, default=_DEFAULTS.flood_timeout_s,
                        help="seconds a flood may take before it is failed (default 120)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        limits = RunLimits(duration_s=args.duration, warmup_s=args.warmup,
                           max_messages=args.max_messages, flood_chunk=args.flood_chunk,
                           flood_timeout_s=args.flood_timeout, loop=args.loop)
    except ValueError as exc:
        parser.error(str(exc))
    if args.flood < 0:
        parser.error("--flood must be >= 0")
    impls = [Impl.C, Impl.PY] if args.impl == "both" else [Impl(args.impl)]
    batching = {"on": [True], "off": [False], "both": [True, False]}[args.batching]
    matrix = scenarios(impls, batching, args.windows, args.flood)
    if not matrix:
        parser.error("nothing to run: give --windows and/or --flood")
    if Impl.C in impls and _compat.NO_EXTENSIONS is False and not _compat.EXTENSIONS_ACTIVE:
        print("warning: the Cython extensions are not built; 'c' rows run the pure twins",
              file=sys.stderr)

    def progress(result: ScenarioResult) -> None:
        if sys.stderr.isatty():
            state = result.error or f"{result.msgs_per_s:,.0f} msg/s"
            print(f"  {result.scenario.label}: {state}", file=sys.stderr, flush=True)

    results = run_matrix(matrix, limits, progress)
    if args.json:
        print(json.dumps(to_document(results, limits), indent=2))
    else:
        print(format_table(results))
    return 1 if any(r.error is not None for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
