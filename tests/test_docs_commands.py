"""Every `medagent ...` command line the README and docs/*.md show must parse, and every sample
file they send must exist: the docs cannot drift from the command line again.

Command lines are taken from fenced code blocks and from inline code spans; a trailing comment,
redirection or pipe is cut off. Each is parsed by the real `medagent` parser (an unknown
subcommand or option fails here exactly as it would for a user).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from medagent.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
_SPAN = re.compile(r"`(medagent [^`]+)`")


def _command_lines(text: str) -> list[str]:
    lines = []
    for block in _FENCE.findall(text):
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("medagent "):
                lines.append(line)
            elif "&& medagent " in line:
                lines.append(line[line.index("&& medagent ") + 3 :])
    lines += _SPAN.findall(_FENCE.sub("", text))
    return lines


def _argv(line: str) -> list[str]:
    line = re.split(r"\s+#\s", line, maxsplit=1)[0]
    line = re.split(r"\s[|>]\s?|\s&&\s", line, maxsplit=1)[0]
    return shlex.split(line)[1:]


def _cases() -> list[tuple[str, str]]:
    cases = []
    for doc in DOCS:
        if doc.exists():
            cases += [(doc.relative_to(ROOT).as_posix(), line) for line in _command_lines(doc.read_text())]
    return cases


@pytest.mark.skipif(not (ROOT / "README.md").exists(), reason="needs the source tree (README and docs)")
def test_the_docs_show_commands() -> None:
    assert len(_cases()) >= 10


@pytest.mark.parametrize(("doc", "line"), _cases())
def test_documented_command_parses(doc: str, line: str) -> None:
    argv = _argv(line)
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --version / --help print and exit 0
            return
        pytest.fail(f"{doc}: `{line}` does not parse (exit {exc.code})")
    for arg in argv:
        if arg.endswith((".hl7", ".astm", ".dcm")) and "/" not in arg.lstrip("./"):
            pytest.fail(f"{doc}: `{line}` sends {arg}, which the docs must not assume exists; use a shipped sample")
        if arg.endswith((".hl7", ".astm", ".dcm")):
            assert (ROOT / arg).exists(), f"{doc}: `{line}` names {arg}, which does not exist"
