"""``medagent config example | check``: a commented starting file, and a validator for yours.

``example`` prints a TOML file whose values are the defaults (``medagent serve`` with no file
behaves exactly like it), followed by a commented ``[[channel]]`` example for every channel kind
this installation has. ``check FILE`` loads a file the way ``medagent serve --config`` does and
prints what it would run, or the error (file, key, problem) with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from medagent.config import ConfigError, default_config_toml, load_config

__all__ = ["register", "example_toml", "KIND_EXAMPLES"]

EXIT_OK, EXIT_USAGE = 0, 2

#: scheme -> a commented [[channel]] example (printed when the kind is installed)
KIND_EXAMPLES: dict[str, tuple[str, str, str]] = {
    "dicom": ("pacs-in", "dicom://0.0.0.0:11112?aet=MEDAGENT", "DICOM C-ECHO/C-STORE (docs/dicom.md)"),
    "astm": ("analyzer-1", "astm://0.0.0.0:5000", "ASTM E1381/E1394 over TCP (docs/channels-lab.md)"),
    "astm+serial": ("analyzer-2", "astm+serial:///dev/ttyUSB0?baud=9600", "ASTM over a serial port"),
    "tcp": ("bytes-in", "tcp://0.0.0.0:5100?startChar=%02&endChar=%03", "framed byte stream (Medplum's)"),
    "serial": ("bytes-serial", "serial:///dev/ttyS0?baud=9600&startChar=%02&endChar=%03", "byte stream on a serial port"),
}


def _installed(scheme: str) -> bool:
    from medagent.channels.base import channel_kind

    try:
        channel_kind(scheme)
    except (LookupError, ImportError):
        return False
    return True


def example_toml() -> str:
    parts = [default_config_toml().rstrip("\n")]
    for scheme, (name, endpoint, what) in KIND_EXAMPLES.items():
        if _installed(scheme):
            parts.append(f'\n# [[channel]]                         # {what}\n# name = "{name}"\n# endpoint = "{endpoint}"')
    return "\n".join(parts) + "\n"


def register(subparsers: Any) -> None:
    config = subparsers.add_parser("config", help="print an example configuration, or check a file",
                                   description="Print a commented example configuration, or check a file.")
    sub = config.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    sub.add_parser("example", help="print a commented TOML file whose values are the defaults")
    check = sub.add_parser("check", help="load a file as `medagent serve --config` would and report")
    check.add_argument("file", type=Path)
    check.add_argument("--json", action="store_true", help="print one JSON document")
    config.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.config_command == "example":
        sys.stdout.write(example_toml())
        return EXIT_OK
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        if args.json:
            sys.stdout.write(orjson.dumps({"ok": False, "error": str(exc)}).decode() + "\n")
        else:
            print(f"medagent: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    channels = [{"name": c.name, "endpoint": c.endpoint.url, "bot": c.bot} for c in config.channels]
    if args.json:
        sys.stdout.write(orjson.dumps({"ok": True, "data_dir": str(config.agent.data_dir),
                                       "hub": config.agent.hub, "channels": channels}).decode() + "\n")
        return EXIT_OK
    print(f"{args.file}: ok")
    print(f"  data dir: {config.agent.data_dir}")
    print(f"  hub:      {config.agent.hub}")
    for channel in channels:
        print(f"  channel {channel['name']}: {channel['endpoint']} -> {channel['bot']}")
    return EXIT_OK
