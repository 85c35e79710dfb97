"""The hub store's async interface, which every hub module uses (never an engine directly).

Why async: the hub is one event loop; a store call that blocked it would stall every agent's
socket. Each engine decides how it avoids that (SQLite: a thread for reads and admin writes;
PostgreSQL: an async driver). The hot path — :meth:`HubStore.write_round`, one transaction
for many agents' batches and replies — is driven by ONE :class:`~medagent.hub.writer.StoreWriter`
per hub process, which never runs two rounds at once.

Invariants every engine keeps (tests/hub run against each):

* ``callback`` is UNIQUE: a message is stored at most once; a resend increments ``duplicate`` on
  the stored row and gets the stored reply instead of a new row — also when several hub
  processes take the same resend at once (PostgreSQL).
* A message row exists (committed) before ``write_round`` returns, hence before the agent gets
  ``agent:batch:ack`` or a reply. Its bot runs after that commit, or — an inline bot, through
  the round's :data:`~medagent.hub.records.Answer` — inside the transaction, its result
  committed with the row (one row write per message instead of an insert and an update).
* Message queries are keyset-paginated by id and never return more than 1000 rows.
* ``config_generation`` increases with every agent/channel change made through this object, so
  in-process caches (intake) see the change at once.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from medagent.hub.records import (
    AgentCredentials,
    AgentRecord,
    AgentStatus,
    Answer,
    BotRecord,
    ChannelRecord,
    ChannelStatus,
    IncomingMessage,
    IntakeResult,
    MessagePage,
    MessageQuery,
    MessageRecord,
    MessageResult,
    ResourceRecord,
)
from medagent.hub.store.common import DEFAULT_BOT

__all__ = ["HubStore"]


class HubStore(abc.ABC):
    """Agents, channels, bots, messages and bot-made resources of one hub (async)."""

    #: the store's URL without credentials, for logs and ``medagent hub`` output
    url: str
    config_generation: int = 0
    #: the database file when the store is one on the hub's disk (SQLite), else None
    path: Path | None = None
    #: whether text columns can hold a NUL character (PostgreSQL's cannot: intake refuses such
    #: a message alone instead of failing the group commit of everyone in its round)
    stores_nul: bool = True

    # -- lifecycle ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads; further calls raise StoreError."""

    async def start_hot_path(self) -> None:
        """Called once by the hub's StoreWriter before its first round (engine tuning)."""

    async def stop_hot_path(self) -> None:
        """Called by the StoreWriter when it stops (after its last round)."""

    # -- agents -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_agent(self, name: str, settings: dict[str, Any] | None = None) -> AgentCredentials:
        """Register an agent; the returned ``client_secret`` is not stored in clear anywhere."""

    @abc.abstractmethod
    async def reset_client_secret(self, agent_id: str) -> AgentCredentials:
        """Issue a new client secret (the old one and its tokens stop working); shown once."""

    @abc.abstractmethod
    async def get_agent(self, agent_id: str) -> AgentRecord: ...

    @abc.abstractmethod
    async def find_agent(self, id_or_name: str) -> AgentRecord:
        """The agent whose id or (else) name is ``id_or_name``."""

    @abc.abstractmethod
    async def list_agents(self, name: str | None = None) -> list[AgentRecord]: ...

    @abc.abstractmethod
    async def client_secret_hash(self, client_id: str) -> tuple[str, str, int] | None:
        """``(agent_id, secret_hash, token_generation)`` of a client id, for the token endpoint."""

    @abc.abstractmethod
    async def token_generation(self, agent_id: str) -> int | None:
        """The agent's current token generation; None: no such agent."""

    @abc.abstractmethod
    async def revoke_tokens(self, agent_id: str) -> int:
        """Refuse every access token issued to the agent so far; returns the new generation."""

    @abc.abstractmethod
    async def shared_secret(self, name: str, proposed: str) -> str:
        """The hub-wide secret ``name`` (the token signing key, the admin token): stored as
        ``proposed`` if absent; the first process to store it wins and every process gets the
        stored value, so several hub processes sign and check with the same key."""

    @abc.abstractmethod
    async def set_upgrade_status(self, agent_id: str, status: str) -> None:
        """Keep ``status`` (JSON text: the agent's ``$stats`` upgrade section) as the agent's
        latest remote-upgrade outcome."""

    @abc.abstractmethod
    async def upgrade_status(self, agent_id: str) -> str | None:
        """The JSON text kept by :meth:`set_upgrade_status`; None: nothing known."""

    @abc.abstractmethod
    async def set_agent_status(self, agent_id: str, status: AgentStatus) -> None:
        """Set ``Agent.status``; turning an agent ``off`` also revokes its tokens."""

    @abc.abstractmethod
    async def set_agent_settings(self, agent_id: str, settings: dict[str, Any]) -> None: ...

    # -- bots and channels --------------------------------------------------------------------

    @abc.abstractmethod
    async def ensure_bot(self, callable_spec: str, name: str | None = None) -> BotRecord:
        """The bot running ``callable_spec`` ("module:function"), created on first use."""

    @abc.abstractmethod
    async def get_bot(self, bot_id: str) -> BotRecord: ...

    @abc.abstractmethod
    async def add_channel(self, agent_id: str, name: str, address: str, bot: str = DEFAULT_BOT) -> ChannelRecord:
        """Add a channel (an ``Endpoint`` of the agent) whose messages go to ``bot``."""

    @abc.abstractmethod
    async def update_channel(self, channel_id: str, *, address: str | None = None, bot: str | None = None,
                             status: ChannelStatus | None = None) -> ChannelRecord:
        """Change a channel's address, bot or status (``None`` keeps the current value)."""

    @abc.abstractmethod
    async def remove_channel(self, channel_id: str) -> None:
        """Delete a channel; its stored messages stay."""

    @abc.abstractmethod
    async def get_channel(self, channel_id: str) -> ChannelRecord: ...

    @abc.abstractmethod
    async def list_channels(self, agent_id: str) -> list[ChannelRecord]: ...

    @abc.abstractmethod
    async def channel_bot(self, agent_id: str, channel_name: str) -> tuple[ChannelRecord, BotRecord] | None:
        """The channel of an agent by name and its bot, or ``None``."""

    # -- messages -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def write_round(
        self, incoming: Sequence[Sequence[IncomingMessage]], results: Iterable[MessageResult],
        answers: Sequence[Answer | None] = (), before_commit: Callable[[], None] | None = None,
    ) -> list[list[IntakeResult]]:
        """Both hot-path writes of one round in ONE transaction: first the replies of processed
        messages, then each group of inbound messages (so a resend in a group already sees a
        reply recorded in the same round). ``answers`` (one per group, or empty) is asked for
        the result of each message of its group that needs its bot; the result commits with the
        message. Returns the intake results per group.

        ``before_commit`` is called on the event loop's thread once every row of the round is
        written and only the COMMIT is left, by a store where by then only the COMMIT failing can
        change the round's outcome (SQLite: the round is the database's only writer, under BEGIN
        IMMEDIATE); the intake sends the answers found in the round from it, so they travel
        while the commit runs. A store that cannot promise that (PostgreSQL: an insert may
        still meet a row another hub process stored) never calls it. It must not raise."""

    async def store_incoming(self, messages: Sequence[IncomingMessage],
                             answer: Answer | None = None) -> list[IntakeResult]:
        """Store many inbound messages in one transaction; one result per message, in order."""
        return (await self.write_round([messages], (), [answer]))[0]

    async def record_results(self, results: Iterable[MessageResult]) -> None:
        """Write the replies and statuses of many processed messages in one transaction."""
        await self.write_round((), results)

    @abc.abstractmethod
    async def query_messages(self, query: MessageQuery) -> MessagePage:
        """One keyset page of messages matching ``query``, oldest first (InvalidValue for a
        cursor or instant outside a signed 64-bit integer)."""

    @abc.abstractmethod
    async def get_message(self, callback: str) -> MessageRecord: ...

    # -- retention (medagent.hub.retention; each call is one short transaction) ---------------

    @abc.abstractmethod
    async def message_channels(self) -> list[str]:
        """Every channel name that has stored messages."""

    @abc.abstractmethod
    async def purge_bodies(self, channel: str, received_before: int, limit: int) -> int:
        """Blank the bodies of up to ``limit`` of the channel's oldest messages received before
        ``received_before`` (epoch ms); the metadata stays. Returns the count."""

    @abc.abstractmethod
    async def delete_messages(self, channel: str, received_before: int, limit: int) -> int:
        """Delete up to ``limit`` of the channel's oldest messages received before ``received_before``."""

    @abc.abstractmethod
    async def delete_oldest_messages(self, limit: int) -> int:
        """Delete the ``limit`` messages with the lowest ids (the oldest stored), all channels."""

    @abc.abstractmethod
    async def live_bytes(self) -> int:
        """Bytes the store's data occupies (what ``retention_max_bytes`` limits)."""

    @abc.abstractmethod
    async def free_page_bytes(self) -> int:
        """Bytes free inside the store's own files on the hub's disk (0 for a database server)."""

    # -- resources ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def upsert_resource(self, resource_type: str, identifier: str, resource: dict[str, Any]) -> ResourceRecord:
        """Insert or replace the resource keyed by (type, identifier); its id is kept on update."""

    @abc.abstractmethod
    async def get_resource(self, resource_type: str, resource_id: str) -> ResourceRecord: ...

    @abc.abstractmethod
    async def find_resources(self, resource_type: str, identifier: str | None = None,
                             limit: int = 100) -> list[ResourceRecord]: ...

    # -- bulk copy (medagent hub migrate-store) -----------------------------------------------

    @abc.abstractmethod
    async def count_rows(self, table: str) -> int: ...

    @abc.abstractmethod
    def export_rows(self, table: str, batch: int) -> AsyncIterator[list[tuple[Any, ...]]]:
        """Every row of ``table`` (columns in :func:`table_columns` order), in batches, by key."""

    @abc.abstractmethod
    async def import_rows(self, table: str, rows: Sequence[tuple[Any, ...]]) -> int:
        """Insert rows exported from another store, skipping keys already present; returns the
        number inserted. Message ids are kept (the id sequence moves past them)."""
