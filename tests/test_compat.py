"""The selector tells the truth, and a silently missing build is a failure, not a skip."""

import os
import subprocess
import sys

from medagent import _compat


def test_extensions_active_unless_disabled() -> None:
    if _compat.NO_EXTENSIONS:
        assert not _compat.EXTENSIONS_ACTIVE
    else:
        # Extensions were expected (no MEDAGENT_NO_EXTENSIONS): the pure twin must not have
        # been selected silently because the build failed.
        assert _compat.EXTENSIONS_ACTIVE, _compat.implementation_summary()


def _probe(value: str) -> str:
    env = dict(os.environ, MEDAGENT_NO_EXTENSIONS=value)
    code = "import medagent._compat as c; print(c.NO_EXTENSIONS)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False).stdout.strip()


def test_env_values() -> None:
    for value in ("1", "true", "YES"):
        assert _probe(value) == "True"
    for value in ("0", "", "false", "no"):
        assert _probe(value) == ("True" if sys.implementation.name != "cpython" else "False")


def test_bad_env_value_is_a_clear_error() -> None:
    env = dict(os.environ, MEDAGENT_NO_EXTENSIONS="maybe")
    proc = subprocess.run([sys.executable, "-c", "import medagent._compat"], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "MEDAGENT_NO_EXTENSIONS" in proc.stderr


def test_recorded_build_failure_is_the_reason_shown(tmp_path, monkeypatch) -> None:
    recorded = tmp_path / "BUILD_FAILED.txt"
    recorded.write_text("error: command 'gcc' failed: No such file or directory\n")
    monkeypatch.setattr(_compat, "BUILD_FAILED_PATH", recorded)
    assert _compat.build_failure_reason() == "error: command 'gcc' failed: No such file or directory"
    monkeypatch.setattr(_compat, "BUILD_FAILED_PATH", tmp_path / "absent.txt")
    assert _compat.build_failure_reason()  # falls back to the import error or "not built"


def test_auto_build_failure_warns_and_records_why(tmp_path, capsys) -> None:
    """A compile failure in auto mode falls back to pure Python *with a word*: printed, recorded."""
    import runpy
    from pathlib import Path

    import pytest

    setup_py = Path(__file__).resolve().parents[1] / "setup.py"
    if not setup_py.exists():
        pytest.skip("needs the source tree (setup.py)")
    from setuptools import Distribution

    namespace = runpy.run_path(str(setup_py), run_name="medagent_setup")
    command = namespace["OptionalBuildExt"](Distribution())
    command.initialize_options()
    command.build_lib, command.inplace = str(tmp_path), False
    command._fallback(RuntimeError("error: command 'gcc' failed: No such file or directory"))
    assert "C extensions were NOT built: error: command 'gcc' failed" in capsys.readouterr().err
    recorded = tmp_path / "medagent" / "_fast" / "BUILD_FAILED.txt"
    assert recorded.read_text().strip() == "error: command 'gcc' failed: No such file or directory"


def test_every_fast_module_is_built_selected_and_named() -> None:
    """setup.py builds exactly the kernels _compat selects; each has its .pyx and .pyi, and the
    summary (``medagent --version``, serve banner) names every one that is active."""
    import runpy
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parents[1]
    if not (root / "setup.py").exists():
        pytest.skip("needs the source tree (setup.py)")
    namespace = runpy.run_path(str(root / "setup.py"), run_name="medagent_setup")
    assert tuple(namespace["MODULES"]) == _compat.FAST_MODULES
    for name in _compat.FAST_MODULES:
        assert (root / "medagent" / "_fast" / f"{name}.pyx").is_file(), name
        assert (root / "medagent" / "_fast" / f"{name}.pyi").is_file(), name
        if _compat.EXTENSIONS_ACTIVE:
            assert _compat.load_fast(name) is not None
            assert name.lstrip("_") in _compat.implementation_summary()
