"""Smoke test of an *installed* medagent (a wheel or sdist in a clean venv), run by .ci/run.

Starts `medagent serve` with an MLLP channel and the embedded hub on free ports in a temporary
data directory, sends the built-in example with `medagent send --json`, checks the AA, checks
that the message reached the hub with `medagent hub messages --json`, then stops serve with
SIGTERM. Uses only the `medagent` command on PATH, like a user would. Exit status 0 = passed.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEADLINE_S = 90


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        config = Path(tmp) / "medagent.toml"
        config.write_text(
            f'[agent]\ndata_dir = "{data}"\n\n[[channel]]\nname = "smoke"\n'
            'endpoint = "mllp://127.0.0.1:0?ackMode=fast"\nbot = "medagent.hub.bots.ack:handler"\n'
        )
        serve = subprocess.Popen(["medagent", "serve", "--config", str(config), "--hub-port", "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        port: list[int] = []
        found = threading.Event()

        def read() -> None:
            assert serve.stdout is not None
            for line in serve.stdout:
                lines.append(line)
                match = re.search(r"mllp://127\.0\.0\.1:(\d+)", line)
                if match and not port and match.group(1) != "0":
                    port.append(int(match.group(1)))
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        try:
            deadline = time.monotonic() + DEADLINE_S
            while not found.wait(0.2) and serve.poll() is None and time.monotonic() < deadline:
                pass
            if not found.is_set():
                time.sleep(0.5)  # let the reader collect the last lines
                print("smoke: serve did not report its MLLP port:\n" + "".join(lines), file=sys.stderr)
                return 1
            sent = subprocess.run(["medagent", "send", "--to", f"mllp://127.0.0.1:{port[0]}", "--example", "--json"],
                                  capture_output=True, text=True, timeout=60)
            if sent.returncode != 0 or '"AA"' not in sent.stdout:
                print(f"smoke: send failed ({sent.returncode}): {sent.stdout}{sent.stderr}", file=sys.stderr)
                return 1
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                listing = subprocess.run(["medagent", "hub", "messages", "--data-dir", str(data / "hub"), "--json"],
                                         capture_output=True, text=True, timeout=60)
                if listing.returncode == 0 and json.loads(listing.stdout)["messages"]:
                    print(f"smoke: passed (AA from port {port[0]}, message stored in the hub)")
                    return 0
                time.sleep(0.5)
            print("smoke: the message never reached the hub", file=sys.stderr)
            return 1
        finally:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                serve.kill()


if __name__ == "__main__":
    sys.exit(main())
