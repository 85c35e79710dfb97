"""`medagent serve`: run the agent (and, by default, its embedded hub) until Ctrl-C or SIGTERM.

Without --config the agent runs DESIGN.md's built-in default: one HL7 channel on
127.0.0.1:2575 in fast mode, and an embedded hub on 127.0.0.1:8103 with the ACK-and-store bot.
On a signal it stops accepting, gives every committed message its ACK, flushes the queue and
closes; a second Ctrl-C is not needed and not honoured until then (bounded by the drain timeout).

Upgrades: when the runtime's upgrader has staged a new version, the serve loop switches to it
(medagent.ops.switch): this process starts the new version with ``--handover SPEC`` (the
inherited listening sockets and the control channel; not for humans), hands over, and exits 0
once the new process reports healthy, or takes everything back and serves on. Under systemd
(``Type=notify``) this process says ``READY=1`` when it serves; the new one says ``MAINPID``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medagent.config import Config, ConfigError, load_config
from medagent.queue.store import QueueError

__all__ = ["register", "run_event_loop", "run_serve"]

log = logging.getLogger("medagent.serve")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the agent (with an embedded hub unless configured otherwise)",
        description="Run the medagent agent: MLLP channels, durable queue, link to the hub.",
    )
    parser.add_argument("--config", "-c", type=Path, help="TOML configuration file (default: built-in defaults)")
    parser.add_argument("--data-dir", type=Path, help="data directory (queue, embedded hub); overrides agent.data_dir")
    parser.add_argument("--hub", help="'embedded' or a hub base URL (https://api.medplum.com/); overrides agent.hub")
    parser.add_argument("--hub-port", type=int, help="port of the embedded hub's HTTP API (default 8103)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument("--handover", help=argparse.SUPPRESS)  # set by an upgrade's switch only
    parser.set_defaults(handler=run_serve)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "agent": {"data_dir": args.data_dir, "hub": args.hub, "log_level": args.log_level},
        "hub": {"port": args.hub_port},
    }


def _serve_argv(args: argparse.Namespace) -> list[str]:
    """The options a new version's process gets at an upgrade (the same configuration)."""
    argv: list[str] = []
    for flag, value in (("--config", args.config and Path(args.config).resolve()),
                        ("--data-dir", args.data_dir and Path(args.data_dir).resolve()),
                        ("--hub", args.hub), ("--hub-port", args.hub_port), ("--log-level", args.log_level)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def run_serve(args: argparse.Namespace) -> int:
    from medagent.ops.handover import HandoverSpec, parse_spec
    from medagent.ops.logs import setup_logging

    spec: HandoverSpec | None = None
    try:
        config = load_config(args.config, overrides=_overrides(args))
        if args.handover is not None:
            spec = parse_spec(args.handover)
    except (ConfigError, ValueError) as exc:
        print(f"medagent: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.agent.log_level)
    if spec is None:
        _exec_upgraded_version(Path(config.agent.data_dir), _serve_argv(args))
    return run_event_loop(lambda: _serve(config, _serve_argv(args), spec))


def _exec_upgraded_version(data_dir: Path, serve_argv: list[str]) -> None:
    """After a completed upgrade the service's command still names the base installation: run
    the newer upgraded version instead (same options). Returns only when there is none."""
    from medagent.ops.upgrade import child_env, upgraded_python

    python = upgraded_python(data_dir)
    if python is None or sys.platform == "win32":
        return
    log.info("starting the upgraded version in %s", python.parent.parent)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(python, [str(python), "-P", "-m", "medagent", "serve", *serve_argv], child_env())


def run_event_loop(main: Callable[[], Any]) -> int:
    """Run `main()` on uvloop where available (never on Windows), else on asyncio."""
    loop_factory = None
    if sys.platform != "win32":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return int(runner.run(main()) or 0)


async def _serve(config: Config, serve_argv: list[str], spec: Any) -> int:
    from medagent.gcpolicy import freeze_startup_heap
    from medagent.ops.sdnotify import notify
    from medagent.ops.switch import LEASE_WAIT_S, switch_available, switch_over, take_over
    from medagent.ops.upgrade import Staged
    from medagent.runtime.agent import AgentRuntime, StartupError
    from medagent.runtime.embedded_hub import HubStartError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: KeyboardInterrupt ends the run instead
            pass
    staged: list[Staged] = []
    switch_wanted = asyncio.Event()

    def on_staged(version: Staged) -> None:
        staged.append(version)
        switch_wanted.set()

    def make_runtime(inherited: Any = None) -> AgentRuntime:
        return AgentRuntime(config, inherited=inherited, lease_wait_s=LEASE_WAIT_S if inherited is not None else 0.0,
                            on_staged=on_staged if switch_available() else None)

    runtime: AgentRuntime | None
    try:
        if spec is None:
            runtime = make_runtime()
            await runtime.start()
            notify("READY=1")
        else:
            runtime = await take_over(spec, make_runtime, stop)
            if runtime is None:
                return 1
    except (StartupError, HubStartError, QueueError) as exc:  # expected: one line, what to do
        print(f"medagent: cannot start: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        log.exception("startup failed")
        print(f"medagent: cannot start: {exc}", file=sys.stderr)
        return 1
    freeze_startup_heap()
    print(_banner(runtime), flush=True)
    try:
        while True:
            await _first(stop, switch_wanted)
            if stop.is_set():
                break
            switch_wanted.clear()
            current, runtime = runtime, None
            try:
                runtime = await switch_over(current, staged.pop(), serve_argv, make_runtime)
            except Exception as exc:
                log.exception("upgrade switch failed")
                print(f"medagent: cannot serve after a failed upgrade switch: {exc}", file=sys.stderr)
                if current.queue is not None:  # it never stopped
                    await current.stop()
                return 1
            if runtime is None:
                return 0  # the new version serves now
            if runtime is not current:
                print(_banner(runtime), flush=True)
    finally:
        if runtime is not None:
            print("medagent: stopping (draining channels, flushing the queue)...", file=sys.stderr, flush=True)
            await runtime.stop()
    return 0


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _banner(runtime: Any) -> str:
    from medagent import __version__, _compat
    from medagent.runtime.channel_set import channel_address

    lines = [f"medagent {__version__} serving ({_compat.implementation_summary()})"]
    addresses = {name: channel_address(channel) for name, channel in runtime.channels.items()}
    for name, address in addresses.items():
        lines.append(f"  channel {name:<12} {address}")
    lines.append(f"  data directory       {runtime.data_dir.resolve()}")
    if runtime.hub is not None:
        lines.append(f"  embedded hub         {runtime.hub.base_url}  (admin token: {runtime.hub.admin_token_path.resolve()})")
        lines.append(f"  dashboard            {runtime.hub.base_url.rstrip('/')}/dashboard/  (log in with the admin token)")
        lines.append(f"  recent messages      medagent hub messages --data-dir {runtime.hub.data_dir}")
    else:
        lines.append(f"  hub                  {runtime.credentials.base_url}")
    first_mllp = next((a for a in addresses.values() if a.startswith("mllp://")), None)
    if first_mllp is not None:
        lines.append(f"  send a test message  medagent send --to {first_mllp} --example")
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)
