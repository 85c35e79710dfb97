"""`medagent send`: send HL7 messages to an MLLP endpoint and print the ACKs.

Input files hold one or more messages: MLLP-framed (as captured off the wire) or plain text with
one segment per line (`\\r`, `\\n` or `\\r\\n`), where every `MSH` segment starts a new message.
`--example` sends a generated ADT^A01 instead; `--example oru|orm|siu` one of the shipped samples
(medagent.samples) with a fresh control id, so repeated sends are new messages, not duplicates. Each message waits for its ACK (matched by MSA-2)
before the next is sent. Exit status: 0 when every message got AA or CA, 1 when any got
AE/AR/CE/CR or no ACK, 2 on usage errors (unreadable file, bad URL).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from medagent.proto import hl7, mllp

__all__ = ["register", "split_messages", "example_message", "sample_message", "EXAMPLES"]

_OK_CODES = {"AA", "CA"}
#: --example kinds: "adt" is generated; the others are shipped samples (medagent.samples)
EXAMPLES = ("adt", "oru", "orm", "siu")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "send",
        help="send HL7 messages over MLLP and print the ACKs",
        description="Send HL7 v2 messages to an MLLP endpoint and print each acknowledgment.",
    )
    parser.add_argument("files", nargs="*", type=Path, help="files with HL7 messages ('-' = standard input)")
    parser.add_argument("--to", required=True, metavar="URL", help="destination, e.g. mllp://127.0.0.1:2575")
    parser.add_argument("--example", nargs="?", const="adt", choices=EXAMPLES, metavar="KIND",
                        help=f"send a test message: {', '.join(EXAMPLES)} (default adt: a generated ADT^A01)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each ACK (default 10)")
    parser.add_argument("--return-ack", choices=["first", "application"], help="which ACK to wait for")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(handler=run_send)


def example_message(control_id: str | None = None) -> bytes:
    """A small ADT^A01 with a fresh control id and timestamp (synthetic data, no real patient)."""
    now = time.strftime("%Y%m%d%H%M%S")
    control_id = control_id or f"MEDAGENT{int(time.time() * 1000)}"
    segments = [
        f"MSH|^~\\&|MEDAGENT|SENDER|RECEIVER|HOSPITAL|{now}||ADT^A01^ADT_A01|{control_id}|P|2.5.1",
        f"EVN|A01|{now}",
        "PID|1||TEST000001^^^MEDAGENT^MR||DOE^JANE^Q||19800101|F|||1 MAIN ST^^SPRINGFIELD^IL^62701",
        "PV1|1|I|WARD^101^A",
    ]
    return ("\r".join(segments) + "\r").encode("ascii")


def sample_message(kind: str, control_id: str | None = None) -> bytes:
    """A shipped sample with MSH-10 replaced by a fresh control id."""
    from medagent import samples

    message = samples.read(kind)
    control_id = control_id or f"MEDAGENT{int(time.time() * 1000)}"
    msh_end = message.find(b"\r")
    fields = message[:msh_end].split(b"|")
    fields[9] = control_id.encode("ascii")
    return b"|".join(fields) + message[msh_end:]


def split_messages(data: bytes) -> list[bytes]:
    """Messages in a file: MLLP frames if it has any, else text split at each MSH segment."""
    if mllp.START_BLOCK in data:
        decoder = mllp.MllpDecoder()
        return [frame for frame in decoder.feed(data) if frame.strip()]
    messages: list[list[bytes]] = []
    for segment in hl7.split_segments(data):
        if segment.startswith(b"MSH") or not messages:
            messages.append([])
        messages[-1].append(segment)
    return [b"\r".join(segs) + b"\r" for segs in messages if segs and segs[0].startswith(b"MSH")]


def _read_inputs(args: argparse.Namespace) -> list[tuple[str, bytes]]:
    items: list[tuple[str, bytes]] = []
    if args.example:
        message = example_message() if args.example == "adt" else sample_message(args.example)
        items.append(("example" if args.example == "adt" else f"example {args.example}", message))
    for path in args.files:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
        found = split_messages(data)
        if not found:
            raise ValueError(f"{path}: no HL7 message found (a message starts with an MSH segment)")
        items.extend((str(path), message) for message in found)
    if not items:
        raise ValueError("nothing to send: give files or --example")
    return items


def run_send(args: argparse.Namespace) -> int:
    from medagent.channels.endpoint import parse_remote

    try:
        parse_remote(args.to)  # a bad destination is a usage error (2), not a failed send (1)
        items = _read_inputs(args)
    except (OSError, ValueError) as exc:
        print(f"medagent send: {exc}", file=sys.stderr)
        return 2
    results = asyncio.run(_send_all(args, items))
    if args.json:
        sys.stdout.write(orjson.dumps({"to": args.to, "results": results}, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for result in results:
            _print_result(result)
    return 0 if all(r.get("ack_code") in _OK_CODES for r in results) else 1


async def _send_all(args: argparse.Namespace, items: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    from medagent.channels.mllp_client import MllpClientError, MllpClientPool

    pool = MllpClientPool(max_clients_per_remote=1, keep_alive=True, response_timeout_s=args.timeout,
                          connect_timeout_s=args.timeout)
    results: list[dict[str, Any]] = []
    try:
        for source, message in items:
            result: dict[str, Any] = {"source": source, "control_id": _control_id(message)}
            started = time.perf_counter()
            try:
                ack = await pool.send(args.to, message, args.return_ack)
            except (MllpClientError, OSError) as exc:
                result["error"] = str(exc)
            else:
                result.update(_describe_ack(ack), latency_ms=round((time.perf_counter() - started) * 1000, 2))
            results.append(result)
    finally:
        await pool.close()
    return results


def _control_id(message: bytes) -> str:
    try:
        return hl7.parse_header(message).control_id
    except hl7.Hl7Error:
        return ""


def _describe_ack(ack: bytes) -> dict[str, Any]:
    try:
        info = hl7.parse_ack(ack)
    except hl7.Hl7Error:
        info = None
    code, text = (info.code, info.text) if info is not None else ("", "")
    return {"ack_code": code, "ack_text": text, "ack": ack.decode("utf-8", errors="replace")}


def _print_result(result: dict[str, Any]) -> None:
    head = f"{result['source']}: {result['control_id'] or '(no MSH-10)'}"
    if "error" in result:
        print(f"{head} -> no ACK: {result['error']}")
        return
    print(f"{head} -> {result['ack_code']} {result['ack_text']}  ({result['latency_ms']} ms)")
    for segment in result["ack"].replace("\r\n", "\r").split("\r"):
        if segment:
            print(f"    {segment}")
