"""Compatibility re-export: the WAL checkpointer lives in :mod:`medagent.storage.checkpoint`.

It is shared by the agent's queue and the hub's store, so it moved to the neutral
``medagent.storage`` package; import it from there in new code.
"""

from medagent.storage.checkpoint import WalCheckpointer

__all__ = ["WalCheckpointer"]
