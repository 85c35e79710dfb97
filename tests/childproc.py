"""A `python -m medagent ...` child process for tests that run the real command line.

The child runs in its own session, so it and everything it starts are stopped by process group
(SIGTERM, then SIGKILL); a reader thread collects its output, so tests can wait for log lines
(never for message bodies) and a full pipe never blocks the child. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

__all__ = ["WAIT_S", "MedagentChild"]

WAIT_S = 30.0  # upper bound of any single wait; a healthy run needs a fraction of it


class MedagentChild:
    """`python -m medagent ARGS` in its own session, all its output collected."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        self.args = args
        self.process = subprocess.Popen(
            [sys.executable, "-m", "medagent", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True, pass_fds=pass_fds,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = WAIT_S) -> re.Match[str]:
        """The first output line matching `pattern`; fails if the child exits or time runs out."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    break
                self._changed.wait(min(remaining, 0.2))
        raise AssertionError(f"medagent {' '.join(self.args[:2])}: no line matching {regex.pattern!r} "
                             f"(exit status {self.process.poll()}); output:\n{self.output}")

    def kill(self) -> None:
        """SIGKILL the process group (a crash: nothing is cleaned up)."""
        self._signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM to the process group, SIGKILL if it does not end in time; the exit status."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(10)
        self._reader.join(5)
        return int(self.process.returncode)

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass
