"""``medagent hub …``: run the hub and manage its agents, channels and messages.

``register(subparsers)`` adds the ``hub`` command to the main ``medagent`` parser; each parsed
command carries ``func(args) -> int`` (the exit status: 0 ok, 1 the work failed, 2 usage or
configuration error). :func:`main` runs the same parser standalone
(``python -m medagent.hub.cli hub add-agent lab --json``). ``serve`` takes the admin token from
``MEDAGENT_HUB_ADMIN_TOKEN`` when set, else from the store (a copy is kept in
``<data-dir>/admin-token``), and the bus from ``--bus`` or ``MEDAGENT_HUB_BUS``
(``redis://...``: several hub processes on one store act as one hub, docs/scale-out.md).

Subcommands: ``serve`` (the default), ``add-agent NAME``, ``add-channel AGENT NAME ADDRESS``, ``add-user NAME``, ``revoke-tokens AGENT``, ``rotate-secret AGENT``,
``list-agents``, ``messages``, ``migrate-store FROM TO``. Management commands work on the store
directly (``--store URL``, default the SQLite file in ``--data-dir``), so they work with or
without a running hub. With ``--json`` a command prints exactly one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from medagent.channels.endpoint import EndpointError, parse_endpoint
from medagent.hub.admin import BadQuery, agent_json, channel_json, message_json, parse_instant_ms
from medagent.hub.dashboard.cli import add_user_parser, run_add_user
from medagent.hub.records import MessageQuery, MessageStatus
from medagent.hub.releases import add_release_parser, run_release_command
from medagent.hub.settings import DEFAULT_DATA_DIR, DEFAULT_PORT, HubSettings
from medagent.hub.store import (
    DB_FILE,
    DEFAULT_BOT,
    HubStore,
    InvalidValue,
    StoreError,
    StoreUnavailable,
    is_postgres,
    open_store,
    sqlite_location,
)
from medagent.ops import time_slice
from medagent.tableview import human_bytes, local_time_ms, render_table

__all__ = ["main", "register", "run"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
MAX_ROW_ID = 2**63 - 1  #: SQLite's INTEGER range: a larger cursor is a usage error, not an overflow
MAX_PAGE = 1000
#: the operator token for ``serve`` (DESIGN.md: every key settable as MEDAGENT_<SECTION>_<KEY>)
ADMIN_TOKEN_ENV = "MEDAGENT_HUB_ADMIN_TOKEN"
STORE_ENV = "MEDAGENT_HUB_STORE"
BUS_ENV = "MEDAGENT_HUB_BUS"
T = TypeVar("T")


def _data_dir_option() -> argparse.ArgumentParser:
    """--data-dir, taken by every hub command; SUPPRESS so a subcommand does not reset the parent's value."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                        help=f"hub data directory (default ./{DEFAULT_DATA_DIR}; `medagent serve` keeps its hub in <data_dir>/hub)")
    common.add_argument("--store", default=argparse.SUPPRESS, metavar="URL",
                        help=f"the hub store: postgresql://user@host:port/db or sqlite:///path (default: {DB_FILE} "
                             f"in the data directory; env {STORE_ENV})")
    return common


def _listen_options() -> argparse.ArgumentParser:
    """What only ``serve`` uses: where to listen and with which certificate."""
    listen = argparse.ArgumentParser(add_help=False)
    listen.add_argument("--host", default=argparse.SUPPRESS, help="listen address (default 127.0.0.1)")
    listen.add_argument("--port", type=int, default=argparse.SUPPRESS, help=f"listen port (default {DEFAULT_PORT}; 0 = any)")
    listen.add_argument("--tls-cert", type=Path, default=argparse.SUPPRESS, help="PEM certificate: serve HTTPS/WSS")
    listen.add_argument("--tls-key", type=Path, default=argparse.SUPPRESS, help="PEM private key of --tls-cert")
    listen.add_argument("--store-pool-size", type=_bounded_int("--store-pool-size", 1, 1000), default=argparse.SUPPRESS,
                        help="connections of a PostgreSQL store's pool (default 10)")
    listen.add_argument("--bus", default=argparse.SUPPRESS, metavar="URL",
                        help="the bus between hub processes: redis://host:port/db (several processes on one store "
                             f"act as one hub) or local (default; env {BUS_ENV})")
    listen.add_argument("--fd", type=_bounded_int("--fd", 0, 1_000_000), default=argparse.SUPPRESS, metavar="N",
                        help="serve on the inherited listening socket N instead of binding --host/--port")
    listen.add_argument("--cpu-slice-ms", type=float, default=argparse.SUPPRESS, metavar="MS",
                        help="the CPU time slice to ask Linux 6.12+ for: tasks with the default slice (an agent or "
                             "device on this box, the database) preempt the hub at once (default 20; 0 = the kernel's)")
    return listen


def register(subparsers: Any) -> None:
    """Add the ``hub`` command (with its subcommands) to ``medagent``'s subparsers."""
    common, listen = _data_dir_option(), _listen_options()
    hub = subparsers.add_parser("hub", parents=[common, listen], help="run and manage medagent's own hub",
                                description="Run medagent's hub, or manage its agents, channels and messages.")
    sub = hub.add_subparsers(dest="hub_command", metavar="COMMAND")
    hub.set_defaults(func=run, handler=run, hub_command="serve")

    sub.add_parser("serve", parents=[common, listen], help="run the hub (the default command)")

    add_agent = sub.add_parser("add-agent", parents=[common], help="register an agent; prints its credentials once")
    add_agent.add_argument("name")
    add_agent.add_argument("--json", action="store_true", help="print one JSON document")

    add_channel = sub.add_parser("add-channel", parents=[common], help="add a channel (Endpoint) to an agent")
    add_channel.add_argument("agent", help="agent id or name")
    add_channel.add_argument("name")
    add_channel.add_argument("address", help="e.g. mllp://0.0.0.0:2575?ackMode=fast")
    add_channel.add_argument("--bot", default=DEFAULT_BOT, help=f"module:function (default {DEFAULT_BOT})")
    add_channel.add_argument("--json", action="store_true", help="print one JSON document")

    list_agents = sub.add_parser("list-agents", parents=[common], help="list agents and their channels")
    list_agents.add_argument("--json", action="store_true", help="print one JSON document")

    add_user_parser(sub, parents=[common]).set_defaults(func=run, handler=run)  # through _COMMANDS

    revoke = sub.add_parser("revoke-tokens", parents=[common],
                            help="refuse every access token issued to an agent so far (it logs in again)")
    revoke.add_argument("agent", help="agent id or name")
    revoke.add_argument("--json", action="store_true", help="print one JSON document")

    add_release_parser(sub, common)

    rotate = sub.add_parser("rotate-secret", parents=[common],
                            help="issue a new client secret (the old one and its tokens stop working)")
    rotate.add_argument("agent", help="agent id or name")
    rotate.add_argument("--json", action="store_true", help="print one JSON document")

    migrate = sub.add_parser("migrate-store", help="copy every row of one hub store into another (resumable)",
                             description="Copy agents, channels, bots, messages and resources from one hub store "
                                         "to another, e.g. sqlite:///var/lib/medagent/hub/hub.sqlite3 to "
                                         "postgresql://medagent@db:5432/medagent. Running it again adds only the "
                                         "rows still missing; the row counts are compared at the end.")
    migrate.add_argument("source", metavar="FROM", help="sqlite:///path/hub.sqlite3 (or a data directory) or postgresql://...")
    migrate.add_argument("target", metavar="TO", help="postgresql://... or sqlite:///path/hub.sqlite3")
    migrate.add_argument("--batch", type=_bounded_int("--batch", 1, 100_000), default=1000, help="rows per transaction")

    messages = sub.add_parser("messages", parents=[common], help="list stored messages (one page)")
    messages.add_argument("--agent", help="agent id or name")
    messages.add_argument("--channel")
    messages.add_argument("--type", help="message type: ADT, or ADT^A01")
    messages.add_argument("--control-id")
    messages.add_argument("--status", choices=[s.value for s in MessageStatus])
    messages.add_argument("--since", help="epoch ms or ISO 8601")
    messages.add_argument("--until", help="epoch ms or ISO 8601")
    messages.add_argument("--after", type=_bounded_int("--after", 0, MAX_ROW_ID), default=0,
                          help="cursor: the 'next' value of the previous page")
    messages.add_argument("--limit", type=_bounded_int("--limit", 1, MAX_PAGE), default=50,
                          help=f"messages per page (1-{MAX_PAGE}, default 50)")
    messages.add_argument("--body", action="store_true", help="include message bodies (PHI)")
    messages.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``hub`` command; returns the exit status."""
    command = _COMMANDS[args.hub_command]
    try:
        return command(args)
    except InvalidValue as exc:
        return _fail(str(exc), EXIT_USAGE)
    except StoreError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except StoreUnavailable as exc:
        return _fail(str(exc), EXIT_FAILURE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medagent")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args))


# -- helpers ------------------------------------------------------------------------------------


def _fail(message: str, status: int) -> int:
    print(f"medagent hub: error: {message}", file=sys.stderr)
    return status


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "data_dir", DEFAULT_DATA_DIR))


def _store_url(args: argparse.Namespace) -> str | None:
    return getattr(args, "store", None) or os.environ.get(STORE_ENV) or None


def _settings(args: argparse.Namespace) -> HubSettings:
    tls_cert, tls_key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    settings = HubSettings(
        data_dir=_data_dir(args), host=getattr(args, "host", "127.0.0.1"),
        port=getattr(args, "port", DEFAULT_PORT), tls_cert=tls_cert, tls_key=tls_key,
        admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None, store=_store_url(args),
        store_pool_size=getattr(args, "store_pool_size", 10),
        bus=getattr(args, "bus", None) or os.environ.get(BUS_ENV) or None, listen_fd=getattr(args, "fd", None),
        cpu_slice_ms=getattr(args, "cpu_slice_ms", time_slice.DEFAULT_SLICE_MS),
    )
    settings.validate()
    return settings


def _bounded_int(name: str, low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range ({low}-{high})")
        return value

    parse.__name__ = name
    return parse


class MissingStore(StoreError):
    """A command that reads the hub's data was pointed at a directory that holds none."""


def _with_store(args: argparse.Namespace, work: Callable[[HubStore], Awaitable[T]], *, create: bool = False) -> T:
    """Run ``work`` on the hub store of --store/--data-dir, closed afterwards. A SQLite store
    must exist unless ``create`` (only ``add-agent``: first-time setup)."""
    url = _store_url(args)
    if not create and not is_postgres(url):
        directory, name = sqlite_location(url, _data_dir(args))
        if not (directory / name).is_file():
            raise MissingStore(
                f"no hub data in {directory.resolve()} (no {name}); pass the hub's --data-dir or --store "
                "(`medagent serve` keeps its embedded hub in <data_dir>/hub)"
            )

    async def session() -> T:
        store = await open_store(url, _data_dir(args))
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(session())


def validate_channel(address: str, bot: str) -> str | None:
    """The agent's own checks, at registration: the endpoint parses and the bot imports."""
    try:
        parse_endpoint(address)
    except (EndpointError, LookupError, ValueError) as exc:
        return str(exc)
    module_name, _, function = bot.partition(":")
    if not module_name or not function:
        return f"bot {bot!r} is not of the form module:function"
    try:
        target = getattr(importlib.import_module(module_name), function)
    except ImportError as exc:
        return f"bot {bot!r}: cannot import {module_name}: {exc}"
    except AttributeError:
        return f"bot {bot!r}: {module_name} has no {function}"
    if not callable(target):
        return f"bot {bot!r}: {function} is not callable"
    return None


# -- commands -----------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    cpu_slice = _request_time_slice(settings.cpu_slice_ms)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_serve_until_signal(settings, cpu_slice))
    return uvloop.run(_serve_until_signal(settings, cpu_slice))


def _request_time_slice(slice_ms: float) -> str:
    """Before the loop and its threads start, so every thread of the hub inherits the slice.
    Returns the start-up line's description."""
    if not slice_ms:
        return "the kernel's default (cpu_slice_ms 0)"
    granted = time_slice.request_slice(slice_ms)
    if granted is None:
        return "the kernel's default (custom slices need Linux 6.12+ and SCHED_OTHER)"
    return f"{granted:g} ms (tasks with the default slice preempt the hub)"


async def _serve_until_signal(settings: HubSettings, cpu_slice: str) -> int:
    from medagent.gcpolicy import freeze_startup_heap
    from medagent.hub.bus import BusConfigError
    from medagent.hub.server import HubServer

    server = HubServer(settings)
    try:
        await server.start()
    except BusConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        return _fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", EXIT_FAILURE)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: Ctrl-C raises KeyboardInterrupt
            pass
    freeze_startup_heap()
    token_file = server.admin_token_file
    print(f"medagent hub listening on {server.url}", flush=True)
    print(f"  websocket:   {server.ws_url}", flush=True)
    print(f"  data dir:    {server.data_dir.resolve()}", flush=True)
    print(f"  admin token: {token_file.resolve() if token_file else '(given in the settings)'}", flush=True)
    print(f"  store:       {server.store.url}", flush=True)
    print(f"  bus:         {type(server.context.bus).__name__} (process {server.context.bus.process_id})", flush=True)
    print(f"  cpu slice:   {cpu_slice}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
    print("medagent hub stopped", flush=True)
    return EXIT_OK


def _add_agent(args: argparse.Namespace) -> int:
    credentials = _with_store(args, lambda store: store.add_agent(args.name), create=True)
    if args.json:
        _print_json(dataclasses.asdict(credentials))
    else:
        print(f"agent_id:      {credentials.agent_id}")
        print(f"client_id:     {credentials.client_id}")
        print(f"client_secret: {credentials.client_secret}")
        print("The client secret is shown only now; keep it in the agent's configuration.")
    return EXIT_OK


def _add_channel(args: argparse.Namespace) -> int:
    problem = validate_channel(args.address, args.bot)
    if problem is not None:
        return _fail(problem, EXIT_USAGE)
    async def work(store: HubStore) -> tuple[Any, Any]:
        agent = await store.find_agent(args.agent)
        return agent, await store.add_channel(agent.id, args.name, args.address, args.bot)

    agent, channel = _with_store(args, work)
    if args.json:
        _print_json(channel_json(channel))
    else:
        print(f"channel {channel.name} ({channel.address}) added to agent {agent.name}: Endpoint/{channel.id}")
    return EXIT_OK


def _list_agents(args: argparse.Namespace) -> int:
    async def work(store: HubStore) -> list[tuple[Any, list[Any]]]:
        return [(agent, await store.list_channels(agent.id)) for agent in await store.list_agents()]

    rows = _with_store(args, work)
    if args.json:
        _print_json({"agents": [{**agent_json(a), "channels": [channel_json(c) for c in cs]} for a, cs in rows]})
        return EXIT_OK
    if not rows:
        print("no agents (add one with: medagent hub add-agent NAME)")
        return EXIT_OK
    print(render_table(["AGENT", "ID", "STATUS", "CLIENT ID", "CHANNEL", "ENDPOINT", "CHANNEL STATUS"],
                       _agent_rows(rows)))
    return EXIT_OK


def _agent_rows(rows: list[tuple[Any, list[Any]]]) -> list[tuple[object, ...]]:
    """One line per channel; an agent without channels still gets its line."""
    out: list[tuple[object, ...]] = []
    for agent, channels in rows:
        head = (agent.name, agent.id, agent.status.value, agent.client_id)
        if not channels:
            out.append((*head, None, None, None))
        out.extend((*head, c.name, c.address, c.status.value) for c in channels)
    return out


def _messages(args: argparse.Namespace) -> int:
    try:
        since = parse_instant_ms(args.since, "--since") if args.since else None
        until = parse_instant_ms(args.until, "--until") if args.until else None
    except BadQuery as exc:
        return _fail(str(exc), EXIT_USAGE)

    async def work(store: HubStore) -> Any:
        query = MessageQuery(
            agent_id=(await store.find_agent(args.agent)).id if args.agent else None,
            channel=args.channel, message_type=args.type, control_id=args.control_id,
            status=MessageStatus(args.status) if args.status else None, since=since, until=until,
            after_id=args.after, limit=args.limit, include_body=args.body,
        )
        return await store.query_messages(query)

    page = _with_store(args, work)
    if args.json:
        _print_json({"messages": [message_json(m) for m in page.messages], "next": page.next_after_id})
        return EXIT_OK
    print(render_table(
        ["ID", "RECEIVED", "CHANNEL", "TYPE", "CONTROL ID", "STATUS", "REPLY", "SIZE", "NOTE"],
        [(m.id, local_time_ms(m.received_at), m.channel, m.message_type or m.content_type, m.control_id,
          m.status.value, m.reply_status, human_bytes(m.body_size),
          "; ".join(filter(None, ["duplicate" if m.duplicate else "", m.error or ""])) or None)
         for m in page.messages],
        empty="no messages match",
    ))
    if args.body:
        for m in page.messages:
            print(f"\n--- message {m.id} body ({m.content_type}) ---")
            print((m.body or "").replace("\r", "\n").rstrip("\n"))
            if m.reply_body:
                print(f"--- message {m.id} reply ({m.reply_content_type}) ---")
                print(m.reply_body.replace("\r", "\n").rstrip("\n"))
    if page.next_after_id is not None:
        print(f"more: --after {page.next_after_id}")
    return EXIT_OK


def _revoke_tokens(args: argparse.Namespace) -> int:
    async def work(store: HubStore) -> tuple[Any, int]:
        agent = await store.find_agent(args.agent)
        return agent, await store.revoke_tokens(agent.id)

    agent, generation = _with_store(args, work)
    if args.json:
        _print_json({"agent_id": agent.id, "token_generation": generation})
    else:
        print(f"tokens of agent {agent.name} revoked; HTTP calls with them are refused from now on "
              "(a running hub closes the agent's websocket on revocation through its HTTP API: "
              "POST /admin/agents/{id}/revoke-tokens)")
    return EXIT_OK


def _rotate_secret(args: argparse.Namespace) -> int:
    async def work(store: HubStore) -> Any:
        return await store.reset_client_secret((await store.find_agent(args.agent)).id)

    credentials = _with_store(args, work)
    if args.json:
        _print_json(dataclasses.asdict(credentials))
    else:
        print(f"client_id:     {credentials.client_id}")
        print(f"client_secret: {credentials.client_secret}")
        print("The new secret is shown only now; the old one and its tokens no longer work.")
    return EXIT_OK


def _migrate_store(args: argparse.Namespace) -> int:
    from medagent.hub.store.copy import copy_store

    source, target = _store_argument(args.source), _store_argument(args.target)
    if source == target:
        return _fail("FROM and TO name the same store", EXIT_USAGE)
    if not is_postgres(source):
        directory, name = sqlite_location(source, Path("."))
        if not (directory / name).is_file():
            return _fail(f"no hub store at {directory / name}", EXIT_USAGE)

    async def work() -> int:
        src = await open_store(source, Path("."))
        try:
            dst = await open_store(target, Path("."))
            try:
                print(f"copying {src.url} -> {dst.url}", flush=True)
                report = await copy_store(src, dst, lambda line: print(line, flush=True), args.batch)
            finally:
                await dst.close()
        finally:
            await src.close()
        for table, (src_rows, dst_rows, _) in report.tables.items():
            print(f"verified {table}: {src_rows} in the source, {dst_rows} in the target", flush=True)
        if report.mismatches:
            return _fail("row counts differ after the copy: " + "; ".join(report.mismatches)
                         + " (did the source change, or did the target hold another hub's rows?)", EXIT_FAILURE)
        print("migrate-store: done; point the hub at the target with --store or [hub] store", flush=True)
        return EXIT_OK

    return asyncio.run(work())


def _store_argument(text: str) -> str:
    """A store URL, or a bare path taken as a SQLite store (a data directory or the file)."""
    if "://" in text:
        return text
    return f"sqlite://{Path(text).resolve()}"


def _add_user(args: argparse.Namespace) -> int:
    """Dashboard operator accounts live beside the hub's data: refuse a directory with none."""
    _with_store(args, _nothing)
    return run_add_user(args)


async def _nothing(store: HubStore) -> None:
    """Opening the store is the check (it exists, it is reachable)."""


_COMMANDS = {
    "add-user": _add_user,
    "revoke-tokens": _revoke_tokens,
    "rotate-secret": _rotate_secret,
    "release": lambda args: run_release_command(args, _data_dir(args)),
    "serve": _serve,
    "add-agent": _add_agent,
    "add-channel": _add_channel,
    "list-agents": _list_agents,
    "messages": _messages,
    "migrate-store": lambda args: _migrate_store(args),
}


if __name__ == "__main__":
    sys.exit(main())
