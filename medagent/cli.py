"""The `medagent` command line: serve | hub | send | queue | bench | config.

Conventions (DESIGN.md, Command line): every command has --help; commands that print data take
--json and then print exactly one JSON document; exit status 0 = success, 1 = the work failed,
2 = usage or configuration error. Each area owns its subcommands (`register(subparsers)` in
its own module) so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from medagent import __version__, _compat

__all__ = ["main", "build_parser", "version_text", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def event_loop_name() -> str:
    """Which event loop `medagent serve` runs on."""
    if sys.platform == "win32":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio (uvloop not installed)"
    return f"uvloop {uvloop.__version__}"


def version_text() -> str:
    return f"medagent {__version__}\n{_compat.implementation_summary()}\nevent loop: {event_loop_name()}"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print version and active implementations")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medagent",
        description="On-premise healthcare integration gateway (HL7 v2, DICOM, ASTM, byte streams) with a Medplum-compatible agent and hub.",
    )
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    from medagent import config_cli, doctor_cli, serve_cli, send_cli, service_cli
    from medagent.hub import cli as hub_cli
    from medagent.queue import cli as queue_cli
    from medagent.bench import cli as bench_cli

    serve_cli.register(subparsers)
    hub_cli.register(subparsers)
    send_cli.register(subparsers)
    queue_cli.register(subparsers)
    bench_cli.register(subparsers)
    config_cli.register(subparsers)
    doctor_cli.register(subparsers)
    service_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(handler(args) or EXIT_OK)
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
