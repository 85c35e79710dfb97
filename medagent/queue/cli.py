"""`medagent queue stats | failed | retry | purge`: look into and repair the agent's durable queue.

These work on the queue file while an agent runs (SQLite WAL readers, short write transactions).
Message bodies are never printed: rows are shown by id, channel, control id, state and reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from medagent.queue import admin
from medagent.tableview import human_bytes, local_time_s, render_table

__all__ = ["register"]

_PURGEABLE = ("confirmed", "failed")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("queue", help="inspect and repair the durable message queue",
                                   description="Inspect and repair the agent's durable message queue.")
    commands = parser.add_subparsers(dest="queue_command", metavar="SUBCOMMAND", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data-dir", type=Path, default=Path("./medagent-data"),
                         help="the agent's data directory (default ./medagent-data)")
        sub.add_argument("--json", action="store_true", help="print one JSON document")

    stats = commands.add_parser("stats", help="counts by state and per-channel depth")
    common(stats)
    stats.set_defaults(handler=_stats)

    failed = commands.add_parser("failed", help="list failed messages (no bodies)")
    common(failed)
    failed.add_argument("--limit", type=int, default=100)
    failed.set_defaults(handler=_failed)

    retry = commands.add_parser("retry", help="send failed messages again")
    common(retry)
    retry.add_argument("ids", nargs="*", type=int, help="row ids (default: every failed message)")
    retry.set_defaults(handler=_retry)

    purge = commands.add_parser("purge", help="delete confirmed or failed messages")
    common(purge)
    purge.add_argument("--state", choices=_PURGEABLE, required=True)
    purge.add_argument("--older-than", type=float, metavar="SECONDS", help="only rows older than this")
    purge.set_defaults(handler=_purge)


def _emit(args: argparse.Namespace, document: Any, human: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(human)


def _check_dir(args: argparse.Namespace) -> int | None:
    if not (args.data_dir / admin.QUEUE_FILENAME).exists():
        print(f"medagent queue: no queue at {args.data_dir / admin.QUEUE_FILENAME}; pass the agent's "
              "--data-dir (the one `medagent serve` printed)", file=sys.stderr)
        return 2
    return None


def _stats(args: argparse.Namespace) -> int:
    if (code := _check_dir(args)) is not None:
        return code
    stats = admin.queue_stats(args.data_dir)
    _emit(args, stats, _stats_text(stats))
    return 0


def _stats_text(stats: dict[str, Any]) -> str:
    """The queue at a glance: states, per-channel backlog, sizes, and who holds the lease."""
    states = stats.get("states", {})
    lease = stats.get("lease")
    writer = (f"{lease.get('holder')} (pid {lease.get('pid')} on {lease.get('host')})" if lease else "none (no agent running)")
    summary = render_table(["QUEUE", "VALUE"], [
        ("file", stats.get("path")),
        ("pending (to deliver)", stats.get("pending")),
        *((f"state {name}", count) for name, count in states.items()),
        ("database size", human_bytes(stats.get("db_size_bytes"))),
        ("spool files", f"{stats.get('spool_files', 0)} ({human_bytes(stats.get('spool_bytes', 0))})"),
        ("free disk", human_bytes(stats.get("free_bytes"))),
        ("writer", writer),
    ])
    channels = render_table(
        ["CHANNEL", "PENDING", "OLDEST PENDING"],
        [(name, c.get("pending"), _age(c.get("oldest_pending_age_s"))) for name, c in stats.get("channels", {}).items()],
        empty="no channel has pending messages",
    )
    return f"{summary}\n\n{channels}"


def _age(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _failed(args: argparse.Namespace) -> int:
    if (code := _check_dir(args)) is not None:
        return code
    rows = admin.list_failed(args.data_dir, limit=args.limit)
    human = render_table(
        ["ID", "RECEIVED", "CHANNEL", "TYPE", "CONTROL ID", "SIZE", "ATTEMPTS", "REASON"],
        [(r["id"], local_time_s(r["received_at"]), r["channel"], r["message_type"], r["control_id"],
          human_bytes(r["size"]), r["attempts"], r["last_error"]) for r in rows],
        empty="no failed messages",
    )
    _emit(args, rows, human)
    return 0


def _retry(args: argparse.Namespace) -> int:
    if (code := _check_dir(args)) is not None:
        return code
    count = admin.retry_failed(args.data_dir, ids=args.ids or None)
    _emit(args, {"requeued": count}, f"{count} messages queued again")
    return 0


def _purge(args: argparse.Namespace) -> int:
    if (code := _check_dir(args)) is not None:
        return code
    count = admin.purge(args.data_dir, state=args.state, older_than_s=args.older_than)
    _emit(args, {"deleted": count}, f"{count} {args.state} messages deleted")
    return 0
