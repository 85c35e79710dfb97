"""The independent C load client and echo-ACK server, shipped as source and built on demand.

They are independent of medagent's code (plain epoll C), so figures measured with them cannot
be flattered by our own client, and the echo server is the machine's ceiling. The sources ship
inside the package (``medagent/bench/tools/*.c``); :func:`c_tool` compiles one with the system's
C compiler the first time it is needed, into ``$XDG_CACHE_HOME/medagent/bench`` (default
``~/.cache``), keyed by the source's digest so an upgraded source is rebuilt. The equivalent
manual command is ``cc -O2 -o mllp_client $(python -c 'import medagent.bench.ctools as t;
print(t.source("mllp_client"))')``. Linux only (epoll).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

__all__ = ["TOOLS", "CToolError", "c_tool", "source"]

TOOLS = ("mllp_client", "mllp_server")


class CToolError(RuntimeError):
    """The tool cannot be built here (no compiler, not Linux, compile error): the text says why."""


def source(name: str) -> Path:
    if name not in TOOLS:
        raise ValueError(f"unknown C tool {name!r}; one of {', '.join(TOOLS)}")
    return Path(str(resources.files("medagent.bench").joinpath("tools", f"{name}.c")))


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medagent" / "bench"


def c_tool(name: str) -> Path:
    """The built binary of tool ``name``, compiling it first when needed."""
    src = source(name)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    target = _cache_dir() / f"{name}-{digest}"
    if target.is_file():
        return target
    if not sys.platform.startswith("linux"):
        raise CToolError(f"the C {name} uses epoll and builds on Linux only")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise CToolError(f"no C compiler to build the C {name} (install gcc, or pass its path)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".tmp")
    result = subprocess.run([compiler, "-O2", "-o", str(partial), str(src)], capture_output=True, text=True)
    if result.returncode != 0:
        raise CToolError(f"building the C {name} failed: {result.stderr.strip()[-500:]}")
    partial.replace(target)  # atomic: a concurrent run never sees half a binary
    return target
