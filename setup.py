"""Declares medagent's optional Cython extensions; all other metadata is in pyproject.toml.

MEDAGENT_BUILD_EXTENSIONS selects what happens to the Cython twins in medagent/_fast:
  yes        compile them; any failure (no Cython, no compiler) aborts the build
  no         build a pure-Python package (the py3-none-any wheel)
  auto/unset compile them if possible, otherwise fall back to pure Python with a warning
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

MODULES = ["_mllp", "_hl7", "_hl7session"]
#: Written into medagent/_fast when an optional compile failed; read by medagent._compat.
BUILD_FAILED_FILE = "BUILD_FAILED.txt"


def _mode() -> str:
    value = os.environ.get("MEDAGENT_BUILD_EXTENSIONS", "auto").strip().lower() or "auto"
    if value not in ("yes", "no", "auto"):
        sys.exit(f"MEDAGENT_BUILD_EXTENSIONS must be yes, no or auto, not {value!r}")
    return value


class OptionalBuildExt(build_ext):
    """In auto mode a failed compile leaves the pure twins in charge instead of failing."""

    def run(self) -> None:
        for stale in self._failure_files():  # a reason left by an earlier failed build
            if os.path.exists(stale):
                os.remove(stale)
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure
            self._fallback(exc)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._fallback(exc)

    def _fallback(self, exc: Exception) -> None:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        banner = "*" * 78
        print(f"\n{banner}\nWARNING: medagent's C extensions were NOT built: {reason}\n"
              "medagent will run in pure Python (slower). Install a C compiler and Python headers,\n"
              f"or set MEDAGENT_BUILD_EXTENSIONS=yes to make this an error.\n{banner}\n", file=sys.stderr)
        # Recorded inside the package so `medagent --version` and the serve banner can say why.
        for target in self._failure_files():
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8") as handle:
                handle.write(reason + "\n")

    def _failure_files(self) -> list[str]:
        roots = [self.build_lib] + ([os.path.dirname(os.path.abspath(__file__))] if self.inplace else [])
        return [os.path.join(root, "medagent", "_fast", BUILD_FAILED_FILE) for root in roots]


def _extensions(mode: str):
    if mode == "no" or sys.implementation.name != "cpython":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if mode == "yes":
            sys.exit("MEDAGENT_BUILD_EXTENSIONS=yes but Cython is not installed")
        print("WARNING: Cython not available; building pure-Python medagent", file=sys.stderr)
        return []
    from setuptools import Extension

    exts = [Extension(f"medagent._fast.{name}", [f"medagent/_fast/{name}.pyx"]) for name in MODULES]
    return cythonize(
        exts,
        compiler_directives={"language_level": "3", "embedsignature": True},
        quiet=True,
    )


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import it
    mode = _mode()
    setup(
        ext_modules=_extensions(mode),
        cmdclass={"build_ext": build_ext if mode == "yes" else OptionalBuildExt},
    )
