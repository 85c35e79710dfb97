"""The `medagent` command line, run the way an operator runs it: `python -m medagent ...` in a child
process, against real files (a DurableQueue database) and a real MLLP peer on 127.0.0.1.

What is checked (DESIGN.md "Command line"): every command has --help; `--json` prints exactly one
JSON document; exit status 0 = success, 1 = the work failed, 2 = usage or configuration error;
message bodies (PHI) never reach the queue listings. Every child has a timeout, the MLLP peer
binds port 0 and is shut down by its fixture.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medagent import _compat
from medagent.cli import build_parser
from medagent.queue import DuplicatePolicy, DurableQueue, InboundRecord

CHILD_TIMEOUT_S = 60.0
SB, EB, CR = b"\x0b", b"\x1c", b"\r"
#: Marker inside every queued body; it must never appear in a queue listing.
PHI_MARKER = "SECRET-PATIENT-NAME"


# ----------------------------------------------------------------------------------------- helpers


def run_medagent(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m medagent ARGS` with a bounded run time; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "medagent", *args],
        input=stdin, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
        env=env if env is not None else dict(os.environ),
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def one_json_document(out: subprocess.CompletedProcess[str]) -> object:
    """The single JSON document on stdout (json.loads rejects trailing data, so two would fail)."""
    return json.loads(out.stdout)


def hl7_text(control_id: str, newline: str = "\r") -> str:
    segments = [
        f"MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1",
        "EVN|A01|20240101120000",
        f"PID|1||{control_id}^^^HOSP^MR||DOE^JOHN||19700101|M",
    ]
    return newline.join(segments) + newline


def free_port() -> int:
    """A port nothing listens on (bound once and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------ MLLP ACK server


class _ThreadingServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


@dataclass
class AckServer:
    """A threaded MLLP peer that answers every frame with `MSA|<ack_code>|<MSH-10>`."""

    ack_code: str = "AA"
    received: list[bytes] = field(default_factory=list)
    server: socketserver.ThreadingTCPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"mllp://127.0.0.1:{self.server.server_address[1]}"

    def ack_for(self, frame: bytes) -> bytes:
        msh = frame.split(b"\r", 1)[0].decode("latin-1").split("|")
        control_id = msh[9] if len(msh) > 9 else ""
        return (f"MSH|^~\\&|RECVAPP|RECVFAC|SENDAPP|SENDFAC|20240101120000||ACK|A{control_id}|P|2.5.1\r"
                f"MSA|{self.ack_code}|{control_id}|test peer says {self.ack_code}\r").encode("latin-1")

    def start(self) -> AckServer:
        peer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(CHILD_TIMEOUT_S)
                buffer = b""
                for _ in range(10_000):  # bounded: far more frames than any test sends
                    try:
                        chunk = self.request.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buffer += chunk
                    while EB + CR in buffer:
                        frame, _, buffer = buffer.partition(EB + CR)
                        frame = frame[frame.index(SB) + 1:]
                        peer.received.append(frame)
                        self.request.sendall(SB + peer.ack_for(frame) + EB + CR)

        self.server = _ThreadingServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def ack_server() -> Iterator[AckServer]:
    server = AckServer().start()
    yield server
    server.stop()


@pytest.fixture
def ae_server() -> Iterator[AckServer]:
    server = AckServer(ack_code="AE").start()
    yield server
    server.stop()


# ------------------------------------------------------------------------------ version, help


def test_version_names_the_active_implementation_and_loop() -> None:
    out = run_medagent("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("medagent ")
    expected = "extensions: off" if _compat.NO_EXTENSIONS else "extensions: active"
    assert expected in out.stdout
    assert "event loop:" in out.stdout


def test_version_in_pure_mode_says_extensions_off() -> None:
    out = run_medagent("--version", env={**os.environ, "MEDAGENT_NO_EXTENSIONS": "1"})
    assert out.returncode == 0, out.stderr
    assert "extensions: off" in out.stdout
    assert "event loop:" in out.stdout


def test_no_command_is_a_usage_error() -> None:
    out = run_medagent()
    assert out.returncode == 2
    assert "usage: medagent" in out.stdout + out.stderr


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path of the parser tree: (), ("serve",), ("hub", "add-agent"), ..."""
    yield prefix
    for action in parser._actions:  # argparse has no public walk of subparsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _command_paths(sub, (*prefix, name))


def test_every_command_has_help() -> None:
    """Every command path answers --help with its usage (in-process: one interpreter per path
    used to start ~40 interpreters at once, minutes on a loaded 2-core machine)."""
    import contextlib
    import io

    paths = list(_command_paths(build_parser()))
    assert {("serve",), ("send",), ("hub",), ("queue", "stats"), ("queue", "purge")} <= set(paths)
    failures = []
    for path in paths:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                build_parser().parse_args([*path, "--help"])
                code = None
            except SystemExit as exc:
                code = exc.code
        if code not in (0, None) or "usage:" not in out.getvalue():
            failures.append(f"{' '.join(path)} --help -> {code}")
    assert not failures, "\n".join(failures)


def test_help_from_a_fresh_interpreter() -> None:
    """The real entry point, once: `python -m medagent --help` in a child process."""
    child = subprocess.run([sys.executable, "-m", "medagent", "--help"], capture_output=True, text=True,
                           timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 0 and "usage:" in child.stdout, child.stderr


# ----------------------------------------------------------------------------------- queue


def _record(control_id: str, channel: str = "adt-in") -> InboundRecord:
    body = hl7_text(control_id).replace("DOE^JOHN", PHI_MARKER).encode()
    return InboundRecord(channel, "127.0.0.1:40000", "SENDAPP^SENDFAC", control_id, "ADT^A01", body, time.time())


async def _fill_queue(path: Path) -> None:
    """Rows 1-3 confirmed, row 4 failed with a reason, row 5 pending (in flight at close)."""
    queue = DurableQueue(path)
    await queue.open()
    try:
        for i in range(1, 6):
            result = await queue.submit_wait(_record(f"CTRL{i}"), DuplicatePolicy.OFF)
            assert result.ok and result.row_id == i
        batch = await asyncio.wait_for(queue.next_batch(10), 10)
        assert [m.row_id for m in batch] == [1, 2, 3, 4, 5]
        queue.confirm([1, 2, 3])
        queue.fail(4, "hub rejected: AR unknown patient class")
    finally:
        await queue.close()


@pytest.fixture
def queue_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "agent-data"
    data_dir.mkdir()
    asyncio.run(_fill_queue(data_dir / "queue.sqlite3"))
    return data_dir


def _states(data_dir: Path) -> dict[str, int]:
    out = run_medagent("queue", "stats", "--data-dir", str(data_dir), "--json")
    assert out.returncode == 0, out.stderr
    return one_json_document(out)["states"]  # type: ignore[index]


def test_queue_stats_counts_rows_by_state(queue_dir: Path) -> None:
    out = run_medagent("queue", "stats", "--data-dir", str(queue_dir), "--json")
    assert out.returncode == 0, out.stderr
    stats = one_json_document(out)
    assert isinstance(stats, dict)
    assert stats["states"] == {"received": 1, "sent": 0, "confirmed": 3, "failed": 1}
    assert stats["channels"]["adt-in"]["pending"] == 1
    assert stats["lease"] is None  # the queue was closed: nobody is writing


def test_queue_stats_for_humans(queue_dir: Path) -> None:
    out = run_medagent("queue", "stats", "--data-dir", str(queue_dir))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["QUEUE", "VALUE"] and "state confirmed" in out.stdout
    assert "CHANNEL" in out.stdout and "{" not in out.stdout  # tables, not dict reprs
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.stdout)


def test_queue_failed_for_humans_is_a_table_without_bodies(queue_dir: Path) -> None:
    out = run_medagent("queue", "failed", "--data-dir", str(queue_dir))
    assert out.returncode == 0, out.stderr
    header, rule, row = out.stdout.splitlines()[:3]
    assert header.split()[:3] == ["ID", "RECEIVED", "CHANNEL"] and set(rule) <= {"-", " "}
    assert PHI_MARKER not in out.stdout


def test_queue_failed_lists_the_reason_and_no_body(queue_dir: Path) -> None:
    out = run_medagent("queue", "failed", "--data-dir", str(queue_dir), "--json")
    assert out.returncode == 0, out.stderr
    rows = one_json_document(out)
    assert isinstance(rows, list) and len(rows) == 1
    (row,) = rows
    assert row["id"] == 4
    assert row["control_id"] == "CTRL4"
    assert row["last_error"] == "hub rejected: AR unknown patient class"
    assert "body" not in row
    assert PHI_MARKER not in out.stdout + out.stderr
    human = run_medagent("queue", "failed", "--data-dir", str(queue_dir))
    assert human.returncode == 0, human.stderr
    assert "CTRL4" in human.stdout and "unknown patient class" in human.stdout
    assert PHI_MARKER not in human.stdout + human.stderr


def test_queue_retry_requeues_failed_rows(queue_dir: Path) -> None:
    out = run_medagent("queue", "retry", "--data-dir", str(queue_dir), "--json")
    assert out.returncode == 0, out.stderr
    assert one_json_document(out) == {"requeued": 1}
    assert _states(queue_dir) == {"received": 2, "sent": 0, "confirmed": 3, "failed": 0}
    again = run_medagent("queue", "retry", "--data-dir", str(queue_dir), "--json")
    assert one_json_document(again) == {"requeued": 0}
    failed = run_medagent("queue", "failed", "--data-dir", str(queue_dir))
    assert failed.returncode == 0 and "no failed messages" in failed.stdout


def test_queue_retry_by_id_touches_only_that_row(queue_dir: Path) -> None:
    out = run_medagent("queue", "retry", "3", "--data-dir", str(queue_dir), "--json")
    assert out.returncode == 0, out.stderr
    assert one_json_document(out) == {"requeued": 0}  # row 3 is confirmed, not failed
    out = run_medagent("queue", "retry", "4", "--data-dir", str(queue_dir), "--json")
    assert one_json_document(out) == {"requeued": 1}


def test_queue_purge_confirmed_deletes_only_confirmed_rows(queue_dir: Path) -> None:
    out = run_medagent("queue", "purge", "--state", "confirmed", "--data-dir", str(queue_dir), "--json")
    assert out.returncode == 0, out.stderr
    assert one_json_document(out) == {"deleted": 3}
    assert _states(queue_dir) == {"received": 1, "sent": 0, "confirmed": 0, "failed": 1}


def test_queue_purge_refuses_pending_rows(queue_dir: Path) -> None:
    out = run_medagent("queue", "purge", "--state", "received", "--data-dir", str(queue_dir))
    assert out.returncode == 2
    assert "invalid choice" in out.stderr
    assert _states(queue_dir)["received"] == 1


@pytest.mark.parametrize("command", [["stats"], ["failed"], ["retry"], ["purge", "--state", "failed"]])
def test_queue_without_a_queue_is_a_usage_error(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "no-such-dir"
    out = run_medagent("queue", *command, "--data-dir", str(missing), "--json")
    assert out.returncode == 2
    assert out.stdout == ""
    assert f"no queue at {missing / 'queue.sqlite3'}" in out.stderr
    assert not missing.exists()  # looking must not create an empty queue


# ------------------------------------------------------------------------------------ send


def _send_json(*args: str, stdin: str | None = None) -> tuple[int, dict, str]:
    out = run_medagent("send", *args, "--json", "--timeout", "10", stdin=stdin)
    document = one_json_document(out) if out.stdout else {}
    assert isinstance(document, dict)
    return out.returncode, document, out.stderr


def test_send_text_file_with_lf_line_endings(tmp_path: Path, ack_server: AckServer) -> None:
    source = tmp_path / "two.hl7"
    source.write_text(hl7_text("TXT1", "\n") + hl7_text("TXT2", "\n"), newline="")
    code, document, stderr = _send_json("--to", ack_server.url, str(source))
    assert code == 0, stderr
    assert document["to"] == ack_server.url
    results = document["results"]
    assert [(r["source"], r["control_id"], r["ack_code"]) for r in results] == [
        (str(source), "TXT1", "AA"), (str(source), "TXT2", "AA")]
    for result in results:
        assert set(result) >= {"source", "control_id", "ack_code", "ack_text", "ack", "latency_ms"}
        assert "MSA|AA|" + result["control_id"] in result["ack"]
    # each message went as one frame, segments re-terminated with CR as HL7 v2 ch.2 wants
    assert [frame.split(b"\r")[0].split(b"|")[9] for frame in ack_server.received] == [b"TXT1", b"TXT2"]
    assert all(b"\n" not in frame and frame.count(b"\r") == 3 for frame in ack_server.received)


def test_send_mllp_framed_file(tmp_path: Path, ack_server: AckServer) -> None:
    source = tmp_path / "capture.mllp"
    source.write_bytes(b"".join(SB + hl7_text(c).encode() + EB + CR for c in ("FRM1", "FRM2", "FRM3")))
    code, document, stderr = _send_json("--to", ack_server.url, str(source))
    assert code == 0, stderr
    assert [r["control_id"] for r in document["results"]] == ["FRM1", "FRM2", "FRM3"]
    assert ack_server.received == [hl7_text(c).encode() for c in ("FRM1", "FRM2", "FRM3")]


def test_send_from_standard_input(ack_server: AckServer) -> None:
    code, document, stderr = _send_json("--to", ack_server.url, "-", stdin=hl7_text("STDIN1", "\r\n"))
    assert code == 0, stderr
    assert [(r["source"], r["control_id"], r["ack_code"]) for r in document["results"]] == [("-", "STDIN1", "AA")]


def test_send_shipped_samples_with_fresh_control_ids(ack_server: AckServer) -> None:
    for kind in ("oru", "orm", "siu"):
        code, document, stderr = _send_json("--to", ack_server.url, "--example", kind)
        assert code == 0, stderr
        [result] = document["results"]
        assert result["source"] == f"example {kind}" and result["ack_code"] == "AA"
        assert result["control_id"].startswith("MEDAGENT")


def test_send_example(ack_server: AckServer) -> None:
    code, document, stderr = _send_json("--to", ack_server.url, "--example")
    assert code == 0, stderr
    (result,) = document["results"]
    assert result["source"] == "example" and result["ack_code"] == "AA"
    assert result["control_id"].startswith("MEDAGENT")
    assert ack_server.received[0].startswith(b"MSH|^~\\&|MEDAGENT|")


def test_send_for_humans_prints_the_ack(ack_server: AckServer) -> None:
    out = run_medagent("send", "--to", ack_server.url, "--example")
    assert out.returncode == 0, out.stderr
    assert "-> AA test peer says AA" in out.stdout
    assert "    MSA|AA|MEDAGENT" in out.stdout


def test_send_exits_1_when_the_peer_answers_ae(ae_server: AckServer) -> None:
    code, document, _ = _send_json("--to", ae_server.url, "--example")
    assert code == 1
    assert document["results"][0]["ack_code"] == "AE"


def test_send_exits_1_with_a_clear_error_when_nothing_listens() -> None:
    url = f"mllp://127.0.0.1:{free_port()}"
    code, document, _ = _send_json("--to", url, "--example")
    assert code == 1
    (result,) = document["results"]
    assert "ack_code" not in result
    assert "refused" in result["error"] and f"127.0.0.1:{url.rsplit(':', 1)[1]}" in result["error"]
    human = run_medagent("send", "--to", url, "--example", "--timeout", "10")
    assert human.returncode == 1
    assert "no ACK: connect to" in human.stdout and "refused" in human.stdout


def test_send_file_without_msh_is_a_usage_error(tmp_path: Path, ack_server: AckServer) -> None:
    source = tmp_path / "no-msh.hl7"
    source.write_text("EVN|A01|20240101\nPID|1||123\n")
    out = run_medagent("send", "--to", ack_server.url, str(source))
    assert out.returncode == 2
    assert f"{source}: no HL7 message found" in out.stderr
    assert ack_server.received == []


def test_send_missing_file_is_a_usage_error(tmp_path: Path, ack_server: AckServer) -> None:
    out = run_medagent("send", "--to", ack_server.url, str(tmp_path / "absent.hl7"))
    assert out.returncode == 2
    assert "absent.hl7" in out.stderr
    assert ack_server.received == []


def test_send_with_nothing_to_send_is_a_usage_error(ack_server: AckServer) -> None:
    out = run_medagent("send", "--to", ack_server.url)
    assert out.returncode == 2
    assert "nothing to send" in out.stderr


def test_send_rejects_a_non_mllp_url_clearly() -> None:
    out = run_medagent("send", "--to", "ftp://x", "--example")
    assert out.returncode != 0
    assert "ftp://x" in out.stdout + out.stderr and "mllp://" in out.stdout + out.stderr


@pytest.mark.parametrize("url", ["ftp://x", "mllp://127.0.0.1"])
def test_send_bad_url_is_a_usage_error(url: str) -> None:
    out = run_medagent("send", "--to", url, "--example")
    assert out.returncode == 2


def test_send_without_to_is_a_usage_error() -> None:
    out = run_medagent("send", "--example")
    assert out.returncode == 2
    assert "--to" in out.stderr
