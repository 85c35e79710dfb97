"""`medagent serve`: run the agent (and, by default, its embedded hub) until Ctrl-C or SIGTERM.

Without --config the agent runs DESIGN.md's built-in default: one HL7 channel on
127.0.0.1:2575 in fast mode, and an embedded hub on 127.0.0.1:8103 with the ACK-and-store bot.
On a signal it stops accepting, gives every committed message its ACK, flushes the queue and
closes; a second Ctrl-C is not needed and not honoured until then (bounded by the drain timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
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
    parser.set_defaults(handler=run_serve)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "agent": {"data_dir": args.data_dir, "hub": args.hub, "log_level": args.log_level},
        "hub": {"port": args.hub_port},
    }


def run_serve(args: argparse.Namespace) -> int:
    from medagent.ops.logs import setup_logging

    try:
        config = load_config(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"medagent: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.agent.log_level)
    return run_event_loop(lambda: _serve(config))


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


async def _serve(config: Config) -> int:
    from medagent.runtime.agent import AgentRuntime, StartupError
    from medagent.runtime.embedded_hub import HubStartError

    runtime = AgentRuntime(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: KeyboardInterrupt ends the run instead
            pass
    try:
        await runtime.start()
    except (StartupError, HubStartError, QueueError) as exc:  # expected: one line, what to do
        print(f"medagent: cannot start: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        log.exception("startup failed")
        print(f"medagent: cannot start: {exc}", file=sys.stderr)
        return 1
    print(_banner(runtime), flush=True)
    try:
        await stop.wait()
    finally:
        print("medagent: stopping (draining channels, flushing the queue)...", file=sys.stderr, flush=True)
        await runtime.stop()
    return 0


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
