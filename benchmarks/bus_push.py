"""The cost of one routed agent request: LocalBus vs RedisBus (issue 20, docs/scale-out.md).

What is measured
----------------
``bus.request(agent_id, agent:transmit:request, timeout)`` — what ``$push`` with
``waitForResponse`` costs *on top of* the agent's own socket hop — from the caller's call to the
answer in its hands. The holder's deliver handler answers at once with an
``agent:transmit:response`` (no socket, no agent), so only the routing is measured:

* ``local``: :class:`LocalBus`, the holder is this process (``medagent serve``, a lone hub): a
  direct call;
* ``redis, same process``: two :class:`RedisBus` instances in this process (caller and holder)
  over one ``redis-server``: PUBLISH, the holder's pub/sub read, delivery, reply PUBLISH, the
  caller's pub/sub read, all on one event loop;
* ``redis, two processes``: the holder is another OS process (this script with ``--holder``), as
  with two ``medagent hub`` processes behind a load balancer.

Each scenario runs ``--warmup`` requests, then ``--requests`` N sequential requests (one in
flight: the latency p50/p99/max), then N requests with ``--window`` W in flight (throughput,
requests/s). Bounds: every request has a 5 s timeout, each scenario a wall-clock bound, the
holder process and the ``redis-server`` this script starts are stopped by their PID.

Use: ``python benchmarks/bus_push.py [--requests N] [--window W] [--redis URL] [--json]``.
Without ``--redis`` a temporary ``redis-server`` (tests/engines/redis_server.py) is started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medagent.bench.report import machine_info
from medagent.cloud.messages import AgentMessage, TransmitRequest, TransmitResponse, new_callback
from medagent.hub.bus import AgentBus, LocalBus, make_bus

REPO_ROOT = Path(__file__).resolve().parent.parent
AGENT_ID = "bench-agent"
REQUEST_TIMEOUT_S = 5.0
SCENARIO_TIMEOUT_S = 300.0
HOLDER_START_TIMEOUT_S = 30.0
#: a 625-byte HL7 body, as the performance targets' ADT^A01 (content does not matter here)
BODY = "MSH|^~\\&|" + "X" * 616


async def echo(agent_id: str, message: AgentMessage, timeout_s: float | None) -> AgentMessage | None:
    """The holder's deliver handler: answers every transmit request at once."""
    if timeout_s is None:
        return None
    assert isinstance(message, TransmitRequest)
    return TransmitResponse(remote=message.remote, content_type=message.content_type, body="MSA|AA|",
                            callback=message.callback, status_code=200)


@dataclass
class Result:
    scenario: str
    requests: int
    p50_us: float
    p99_us: float
    max_us: float
    window: int
    window_requests_per_s: float


def _request(bus: AgentBus) -> Awaitable[AgentMessage]:
    message = TransmitRequest(remote="mllp://127.0.0.1:2575", content_type="x-application/hl7-v2+er7", body=BODY,
                              callback=new_callback(AGENT_ID))
    return bus.request(AGENT_ID, message, REQUEST_TIMEOUT_S)


async def measure(name: str, caller: AgentBus, requests: int, warmup: int, window: int) -> Result:
    for _ in range(warmup):
        await _request(caller)
    latencies_ns: list[int] = []
    for _ in range(requests):
        start = time.perf_counter_ns()
        await _request(caller)
        latencies_ns.append(time.perf_counter_ns() - start)
    latencies_ns.sort()

    remaining = requests

    async def slot() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await _request(caller)

    began = time.perf_counter()
    await asyncio.gather(*(slot() for _ in range(window)))
    elapsed = time.perf_counter() - began
    q = statistics.quantiles(latencies_ns, n=100, method="inclusive")
    return Result(name, requests, q[49] / 1000, q[98] / 1000, latencies_ns[-1] / 1000, window, requests / elapsed)


async def scenario_local(args: argparse.Namespace) -> Result:
    bus = LocalBus()
    await bus.start(echo)
    await bus.attach(AGENT_ID)
    try:
        return await measure("local", bus, args.requests, args.warmup, args.window)
    finally:
        await bus.close()


async def scenario_redis_same_process(args: argparse.Namespace) -> Result:
    url = _cluster_url(args.redis)
    holder, caller = make_bus(url), make_bus(url)
    await holder.start(echo)
    await caller.start(echo)
    await holder.attach(AGENT_ID)
    try:
        return await measure("redis, same process", caller, args.requests, args.warmup, args.window)
    finally:
        await caller.close()
        await holder.close()


async def scenario_redis_two_processes(args: argparse.Namespace) -> Result:
    url = _cluster_url(args.redis)
    process = await asyncio.create_subprocess_exec(sys.executable, __file__, "--holder", url, stdout=subprocess.PIPE)
    caller = make_bus(url)
    try:
        assert process.stdout is not None
        if not await asyncio.wait_for(process.stdout.readline(), HOLDER_START_TIMEOUT_S):
            raise RuntimeError("the holder process exited before attaching its agent")
        await caller.start(echo)
        return await measure("redis, two processes", caller, args.requests, args.warmup, args.window)
    finally:
        await caller.close()
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), 10)


def _cluster_url(redis_url: str) -> str:
    separator = "&" if "?" in redis_url else "?"
    return f"{redis_url}{separator}cluster=bench{uuid.uuid4().hex[:8]}"


async def hold(url: str) -> None:
    """``--holder``: attach the agent, say so on stdout, answer until killed (bounded)."""
    bus = make_bus(url)
    await bus.start(echo)
    await bus.attach(AGENT_ID)
    print(bus.process_id, flush=True)
    await asyncio.sleep(SCENARIO_TIMEOUT_S * 2)


SCENARIOS: Sequence[Callable[[argparse.Namespace], Awaitable[Result]]] = (
    scenario_local, scenario_redis_same_process, scenario_redis_two_processes)


async def run(args: argparse.Namespace) -> list[Result]:
    return [await asyncio.wait_for(s(args), SCENARIO_TIMEOUT_S) for s in SCENARIOS]


def format_table(results: Sequence[Result]) -> str:
    head = ("scenario", "requests", "p50 µs", "p99 µs", "max µs", "window", "req/s")
    rows = [(r.scenario, str(r.requests), f"{r.p50_us:.0f}", f"{r.p99_us:.0f}", f"{r.max_us:.0f}", str(r.window),
             f"{r.window_requests_per_s:.0f}") for r in results]
    widths = [max(len(row[i]) for row in (head, *rows)) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in (head, *rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per phase (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests first (default 200)")
    parser.add_argument("--window", type=int, default=16, help="requests in flight in the throughput phase")
    parser.add_argument("--redis", help="use this Redis (redis://host:port/db) instead of a temporary one")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--holder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.holder:
        asyncio.run(hold(args.holder))
        return 0
    if min(args.requests, args.window) < 1 or args.warmup < 0:
        parser.error("--requests and --window must be >= 1, --warmup >= 0")
    try:
        import uvloop
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop
    server = None
    if args.redis is None:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from engines.redis_server import RedisServer

        server = RedisServer(Path(tempfile.mkdtemp(prefix="medagent-bus-bench-")))
        server.start()
        args.redis = server.url
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(run(args))
    finally:
        if server is not None:
            server.stop()
    if args.json:
        document: dict[str, Any] = {"machine": machine_info(), "settings": {k: v for k, v in vars(args).items()
                                                                              if k != "holder"},
                                    "results": [asdict(r) for r in results]}
        print(json.dumps(document, indent=2))
    else:
        print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
