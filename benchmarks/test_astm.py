"""Laboratory channel benchmarks: ASTM transmissions/s over TCP and byte-stream frames/s.

* ``test_astm_throughput[1|10]``: N lock-step instruments (benchmarks/astm_load.py) against an
  ``astm://`` channel in its own process over a real DurableQueue; a transmission is ENQ, five
  frames (a 5-record result: H P O R L), EOT, each step answered, the final ACK after the commit.
* ``test_bytestream_throughput[1|10]``: ``tcp://`` frames of ~200 bytes, ``autoRespond`` ACK.
* ``test_baseline_ack_server[1|10]``: the same instruments against a server that ACKs every chunk
  (no parsing, no queue): the ceiling of this sitting, to read the channel's figures against.
* ``test_core_*``: the pure cores alone (pytest-benchmark), per transmission / per frame.

There is no Cython twin for these cores: ``test_core_astm_session`` shows the link layer costs
tens of microseconds per transmission, small beside the six network round trips and the commit
a transmission needs, so a twin would not move the end-to-end figure. Results are printed
and stored in ``extra_info``.

Run: ``pytest benchmarks/test_astm.py -s``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import astm_load

from medagent.proto.astm import AstmLink, MessageReceived
from medagent.proto.bytestream import AutoRespondRule, ByteStreamConfig, ByteStreamFramer

SECONDS = 5.0


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    children: list[subprocess.Popen[str]] = []

    def start(url: str) -> int:
        args = ["baseline"] if url == "baseline" else ["serve", url, str(tmp_path / f"q{len(children)}.sqlite")]
        child = subprocess.Popen([sys.executable, str(Path(astm_load.__file__)), *args],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        children.append(child)
        assert child.stdout is not None
        return int(child.stdout.readline())

    yield start
    for child in children:
        assert child.stdin is not None
        child.stdin.close()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=10)


@pytest.mark.parametrize("instruments", [1, 10])
def test_astm_throughput(serve: Any, instruments: int, benchmark: Any) -> None:
    port = serve("astm://127.0.0.1:0")
    rate = benchmark.pedantic(astm_load.drive_astm, args=(port, instruments, SECONDS), rounds=1, iterations=1)
    benchmark.extra_info["transmissions_per_s"] = rate
    print(f"\nASTM over TCP, {instruments} instrument(s): {rate:,.0f} transmissions/s (5-record results)")
    assert rate > 0


@pytest.mark.parametrize("instruments", [1, 10])
def test_bytestream_throughput(serve: Any, instruments: int, benchmark: Any) -> None:
    port = serve("tcp://127.0.0.1:0?startChar=%02&endChar=%03&autoRespond=%03:%06")
    rate = benchmark.pedantic(astm_load.drive_bytestream, args=(port, instruments, SECONDS), rounds=1, iterations=1)
    benchmark.extra_info["frames_per_s"] = rate
    print(f"\nbyte stream over TCP, {instruments} connection(s): {rate:,.0f} frames/s")
    assert rate > 0


@pytest.mark.parametrize("instruments", [1, 10])
def test_baseline_ack_server(serve: Any, instruments: int, benchmark: Any) -> None:
    """The same ASTM instruments against a server that ACKs every chunk: the sitting's ceiling."""
    port = serve("baseline")
    rate = benchmark.pedantic(astm_load.drive_astm, args=(port, instruments, SECONDS), rounds=1, iterations=1)
    benchmark.extra_info["transmissions_per_s"] = rate
    print(f"\nbaseline (ACK every chunk), {instruments} instrument(s): {rate:,.0f} transmissions/s")
    assert rate > 0


def test_core_astm_session(benchmark: Any) -> None:
    """One receiving transmission through the pure E1381 core (ENQ, 5 frames, commit, EOT)."""
    data = b"\x05" + b"".join(astm_load.result_frames(1, 1)) + b"\x04"

    def one() -> int:
        link = AstmLink()
        events = link.feed(data, 0.0)
        token = next(e.token for e in events if isinstance(e, MessageReceived))
        return len(link.commit_done(token, True, 0.0))

    benchmark(one)


@pytest.mark.parametrize("auto_respond", [False, True])
def test_core_bytestream_frame(benchmark: Any, auto_respond: bool) -> None:
    """64 frames of ~200 bytes per feed through the pure framer (per-byte path with autoRespond)."""
    rules = (AutoRespondRule(b"\x03", b"\x06"),) if auto_respond else ()
    framer = ByteStreamFramer(ByteStreamConfig(0x02, 0x03, auto_respond=rules))
    chunk = (b"\x02" + b"OBX|1|NM|GLU||5.4|mmol/L|3.9-6.1|N|||F" * 5 + b"\x03") * 64
    benchmark(framer.feed, chunk)
    benchmark.extra_info["frames_per_call"] = 64
