"""Neutral storage helpers shared by the agent's queue and the hub's store (no queue or hub
imports here).

* `checkpoint` - `WalCheckpointer`: WAL checkpoints in a background thread;
* `files`      - private (0700/0600) directories, files and SQLite databases, whatever the umask;
* `errors`     - the one PHI-free wording of storage failures;
* `space`      - free-space samples and the low/resume watermark;
* `health`     - the OK / LOW_SPACE / FAILED state machine that gates intake (pure);
* `reserve`    - an emergency reserve file given back when the disk is full.
"""

from medagent.storage.checkpoint import WalCheckpointer
from medagent.storage.errors import STORAGE_ERROR_PREFIX, storage_error_reason
from medagent.storage.files import (
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    create_private_file,
    ensure_private_dir,
    fsync_dir,
    prepare_private_database,
    tighten_file,
    write_private_file,
)
from medagent.storage.health import LOW_SPACE_REASON, StorageHealth, StorageState, Transition
from medagent.storage.reserve import ReserveFile
from medagent.storage.space import DiskSpace, FreeSpaceWatermark, SpaceSampler, disk_space

__all__ = [
    "LOW_SPACE_REASON",
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "STORAGE_ERROR_PREFIX",
    "DiskSpace",
    "FreeSpaceWatermark",
    "ReserveFile",
    "SpaceSampler",
    "StorageHealth",
    "StorageState",
    "Transition",
    "WalCheckpointer",
    "create_private_file",
    "disk_space",
    "ensure_private_dir",
    "fsync_dir",
    "prepare_private_database",
    "storage_error_reason",
    "tighten_file",
    "write_private_file",
]
