"""Durable inbound queue: every accepted device message is committed here before it is ACKed,
then delivered to the hub in FIFO order until the hub confirms it.

* `records`  - row states, duplicate policies, the value types that cross the API;
* `store`    - synchronous SQLite core (WAL, group insert, migrations, lease, retention);
* `durable`  - asyncio facade: group commit per loop iteration, ordered hand-out to the link;
* `admin`    - operator actions for `medagent queue ...` (safe beside a running agent).
"""

from medagent.queue.admin import QUEUE_FILENAME, list_failed, purge, queue_path, queue_stats, retry_failed
from medagent.queue.durable import DurableQueue, QueueClosed
from medagent.queue.records import (
    HL7_V2_CONTENT_TYPE,
    CommitResult,
    DuplicatePolicy,
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
