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
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()


def test_env_values() -> None:
    for value in ("1", "true", "YES"):
        assert _probe(value) == "True"
    for value in ("0", "", "false", "no"):
        assert _probe(value) == ("True" if sys.implementation.name != "cpython" else "False")


def test_bad_env_value_is_a_clear_error() -> None:
    env = dict(os.environ, MEDAGENT_NO_EXTENSIONS="maybe")
    proc = subprocess.run([sys.executable, "-c", "import medagent._compat"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "MEDAGENT_NO_EXTENSIONS" in proc.stderr
