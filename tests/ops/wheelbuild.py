"""Build medagent wheels of other versions from this source tree, for the upgrade tests.

The tree is copied into a temporary directory (sources only: no compiled kernels, caches or
egg-info), ``__version__`` is bumped, optional file edits are applied (to make a broken
release), and ``pip wheel --no-deps`` builds a pure wheel (MEDAGENT_BUILD_EXTENSIONS=no; the
build backend comes from the package index or pip's cache, as for any sdist build).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2]
TOP_FILES = ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in")
BUILD_TIMEOUT_S = 600


def start_build(version: str, workdir: Path, edits: Mapping[str, tuple[str, str]] | None = None) -> subprocess.Popen[bytes]:
    """Start building ``medagent-<version>`` in ``workdir``; ``edits`` = {relative path: (old, new)}."""
    tree = workdir / "src"
    shutil.copytree(SOURCE / "medagent", tree / "medagent",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__", "*.egg-info"))
    for name in TOP_FILES:
        if (SOURCE / name).exists():
            shutil.copy2(SOURCE / name, tree / name)
    init = tree / "medagent" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]+"', f'__version__ = "{version}"', init.read_text()))
    for relative, (old, new) in (edits or {}).items():
        path = tree / relative
        text = path.read_text()
        assert old in text, f"{old!r} not in {relative}"
        path.write_text(text.replace(old, new))
    env = {**os.environ, "MEDAGENT_BUILD_EXTENSIONS": "no"}
    env.pop("PYTHONSAFEPATH", None)
    return subprocess.Popen([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(workdir / "dist"), str(tree)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def finish_build(proc: subprocess.Popen[bytes], workdir: Path) -> Path:
    out, _ = proc.communicate(timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    [wheel] = (workdir / "dist").glob("medagent-*.whl")
    return wheel
