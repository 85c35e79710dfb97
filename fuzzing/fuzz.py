"""atheris (libFuzzer) harness for medagent's decoders: ``python fuzzing/fuzz.py TARGET [libFuzzer args]``.

Theory of operation: atheris instruments the medagent package (pure-Python twins; the Cython
twins are compared against them inside the targets, uninstrumented) and feeds libFuzzer's
mutated inputs to one property of fuzzing/targets.py. A property violation is an
AssertionError, an undocumented exception anything else: both end the run with the crashing
input written as ``crash-<sha1>`` in the working directory (reproduce with
``python fuzzing/fuzz.py TARGET crash-<sha1>``). Targets and their documented exceptions: see
fuzzing/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["medagent", "targets"]):
    import targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} TARGET [libFuzzer args]; targets: {', '.join(targets.TARGETS)}")
    target = targets.TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
