"""`medagent service install [--config FILE] [--user NAME] [--output PATH] [--print]`: write the
systemd unit for `medagent serve` (medagent.ops.service) and say how to enable it. On Windows it
prints the documented service recipe's pointer instead (docs/operations.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from medagent.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from medagent.config import ConfigError, load_config
from medagent.ops.service import DEFAULT_UNIT_PATH, ServiceSpec, systemd_unit

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("service", help="install medagent as a system service (systemd unit)",
                                   description="Install `medagent serve` as a service.")
    sub = parser.add_subparsers(dest="service_command", metavar="COMMAND", required=True)
    install = sub.add_parser("install", help="write a systemd unit for `medagent serve --config FILE`")
    install.add_argument("--config", type=Path, required=True, help="the agent's TOML file")
    install.add_argument("--user", default=None, help="run as this user (default: root, not recommended)")
    install.add_argument("--output", type=Path, default=DEFAULT_UNIT_PATH, help=f"unit file (default {DEFAULT_UNIT_PATH})")
    install.add_argument("--print", dest="print_only", action="store_true", help="print the unit instead of writing it")
    install.add_argument("--privileged-ports", action="store_true", help="allow channel ports below 1024")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if sys.platform == "win32":
        print("Windows: install the service with the recipe in docs/operations.md (WinSW or NSSM).", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"medagent: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    spec = ServiceSpec(config=args.config, data_dir=Path(config.agent.data_dir), user=args.user,
                       privileged_ports=args.privileged_ports)
    unit = systemd_unit(spec)
    if args.print_only:
        sys.stdout.write(unit)
        return EXIT_OK
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(args.output.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # units are world-readable by design
        with os.fdopen(fd, "w") as out:
            out.write(unit)
        os.replace(tmp, args.output)
    except OSError as exc:
        print(f"medagent: cannot write {args.output}: {exc.strerror or exc} (run as root, or use --output/--print)",
              file=sys.stderr)
        return EXIT_FAILURE
    name = args.output.name
    print(f"wrote {args.output}")
    print(f"enable and start it with: systemctl daemon-reload && systemctl enable --now {name}")
    return EXIT_OK
