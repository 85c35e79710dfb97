"""``medagent hub add-user NAME``: create (or with ``--replace`` re-key) a dashboard operator.

The password is read from standard input with ``--password-stdin`` (one line; for scripts), else
asked twice on the terminal without echo. It is stored only as a salted scrypt hash in
``<data-dir>/dashboard.sqlite3`` (0600); replacing it ends the user's open sessions. Works
with or without a running hub (SQLite WAL). Exit status: 0 done, 1 refused (user exists, weak
password), 2 usage error. With ``--json``: ``{"user": NAME, "created": true|false}``.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

import orjson

from medagent.hub.dashboard.accounts import MIN_PASSWORD, AccountError, DashboardDB
from medagent.hub.settings import DEFAULT_DATA_DIR

__all__ = ["add_user_parser", "run_add_user"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def add_user_parser(subparsers: Any, parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    """Add ``add-user`` to the hub's subcommands (``parents`` may carry the common ``--data-dir``)."""
    parser = subparsers.add_parser(
        "add-user", parents=parents or [], help="create a dashboard operator account",
        description="Create an operator account for the hub's dashboard (password stored as a scrypt hash).",
    )
    parser.add_argument("name", help="operator name (1-64 printable characters)")
    parser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    parser.add_argument("--replace", action="store_true", help="set a new password for an existing operator")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    if not any(a.dest == "data_dir" for a in parser._actions):
        parser.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                            help=f"hub data directory (default ./{DEFAULT_DATA_DIR})")
    parser.set_defaults(func=run_add_user, handler=run_add_user)
    return parser


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        print("error: no terminal to ask for the password; use --password-stdin", file=sys.stderr)
        return None
    first = getpass.getpass(f"Password for {args.name} (at least {MIN_PASSWORD} characters): ")
    if getpass.getpass("Repeat the password: ") != first:
        print("error: the passwords differ", file=sys.stderr)
        return None
    return first


def run_add_user(args: argparse.Namespace) -> int:
    password = _read_password(args)
    if password is None:
        return EXIT_USAGE
    data_dir = Path(getattr(args, "data_dir", None) or DEFAULT_DATA_DIR)
    try:
        db = DashboardDB(data_dir)
    except OSError as exc:
        print(f"error: cannot open {data_dir}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        created = db.set_user(args.name, password, replace=args.replace)
    except AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        db.close()
    name = args.name.strip()
    if args.json:
        print(orjson.dumps({"user": name, "created": created}).decode())
    else:
        print(f"operator {name} {'created' if created else 'updated'}; log in at the hub's /dashboard/")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Standalone: ``python -m medagent.hub.dashboard.cli add-user NAME ...``."""
    parser = argparse.ArgumentParser(prog="medagent hub")
    add_user_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
