"""Durable inbound queue: every accepted device message is committed here before it is ACKed,
then delivered to the hub in FIFO order until the hub confirms it.

* `records`  - row states, duplicate policies, the value types that cross the API;
* `store`    - synchronous SQLite core (WAL, group insert, dedup by key and content, file payload
               rows, migrations, lease, retention that deletes payload files with their rows);
* `durable`  - asyncio facade: group commit per loop iteration, ordered hand-out to the link,
               the storage health gate (watermarks, reserve, recovery from a full disk);
* `admin`    - operator actions for `medagent queue ...` (safe beside a running agent);
* `checkpoint` - re-export of `medagent.storage.checkpoint.WalCheckpointer` (moved there: the
               shared SQLite helpers live in the neutral `medagent.storage` package).
"""

from medagent.queue.admin import QUEUE_FILENAME, list_failed, purge, queue_path, queue_stats, retry_failed
from medagent.queue.durable import DurableQueue, QueueClosed
from medagent.queue.records import (
    HL7_V2_CONTENT_TYPE,
    CommitResult,
    DuplicatePolicy,
    FilePayload,
    InboundRecord,
    QueuedMessage,
    RowState,
)
from medagent.queue.store import QueueError, QueueLocked, QueueStore, SchemaTooNew, StorageError

__all__ = [
    "HL7_V2_CONTENT_TYPE",
    "QUEUE_FILENAME",
    "CommitResult",
    "DuplicatePolicy",
    "DurableQueue",
    "FilePayload",
    "InboundRecord",
    "QueueClosed",
    "QueueError",
    "QueueLocked",
    "QueueStore",
    "QueuedMessage",
    "RowState",
    "SchemaTooNew",
    "StorageError",
    "list_failed",
    "purge",
    "queue_path",
    "queue_stats",
    "retry_failed",
]
