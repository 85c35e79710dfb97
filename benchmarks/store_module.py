"""Load a queue store module from a file, so a benchmark can price two versions side by side.

``--compare /tmp/base/medagent/queue/store.py`` runs the store from a frozen copy of the tree in the
same process as the current one: alternating runs in one sitting are what make the ratio fair on a
shared machine. Used by queue_insert.py and queue_pending_scan.py (run them as scripts, so this
folder is on ``sys.path``).
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

from medagent.queue import store as current_store


def load_store(path: str | None) -> ModuleType:
    """The store module at ``path``, or the installed one when ``path`` is None."""
    if path is None:
        return current_store
    spec = importlib.util.spec_from_file_location("medagent_queue_store_under_test", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load a store module from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
