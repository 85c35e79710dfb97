"""`medagent doctor [--config FILE] [--json] [--timeout S]`: checks ports, data-directory
permissions, hub reachability, TLS trust and clock skew (medagent.ops.doctor) and prints what is
wrong and how to fix it. Exit 0 when nothing failed (warnings allowed), 1 on a failure, 2 on a
configuration error."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from medagent.channels.endpoint import redact_url
from medagent.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from medagent.config import ConfigError, load_config
from medagent.ops.doctor import Status, run_checks

__all__ = ["register", "run"]

_MARK = {Status.OK: "ok  ", Status.WARN: "WARN", Status.FAIL: "FAIL"}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("doctor", help="check ports, permissions, hub, TLS trust and clock; say how to fix",
                                   description="Check what keeps the agent from running well and print the fixes.")
    parser.add_argument("--config", type=Path, default=None, help="the agent's TOML file (default: built-in defaults)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the hub (default 5)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        if args.json:
            sys.stdout.write(orjson.dumps({"ok": False, "error": str(exc), "checks": []}).decode() + "\n")
        else:
            print(f"medagent: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    findings = run_checks(config, args.timeout)
    failed = any(f.status is Status.FAIL for f in findings)
    if args.json:
        document = {"ok": not failed, "hub": redact_url(config.agent.hub),
                    "checks": [f.as_dict() for f in findings]}
        sys.stdout.write(orjson.dumps(document).decode() + "\n")
    else:
        for finding in findings:
            print(f"{_MARK[finding.status]}  {finding.check:<15} {finding.detail}")
            if finding.fix and finding.status is not Status.OK:
                print(f"{'':6}{'':<15} fix: {finding.fix}")
        print("problems found" if failed else "no problems found")
    return EXIT_FAILURE if failed else EXIT_OK
