"""The runtime's outbound senders: one per URL scheme, built from the registry with the Agent's settings.

Theory of operation
-------------------
``agent:transmit:request`` pushes (a bot's ``$push``) name their destination by URL
(``mllp://host:port?encoding=...``, ``dicom://AE@host:port``). :class:`OutboundSenders` finds the
:class:`~medagent.channels.base.OutboundSender` of the URL's scheme through
``outbound_sender(scheme)`` and builds it once, on first use, with the Agent's settings
(Medplum's ``Agent.setting[]``: ``keepAlive``, ``maxClientsPerRemote``; see
``remote_config.pool_settings``). A factory gets only the settings its signature accepts (or all
of them when it takes ``**kwargs``), so a kind that has no use for a setting needs no code for it.

:meth:`configure` replaces the settings; senders built with other settings are closed (their
connections end) and rebuilt on next use.

Invariants: at most one sender per scheme; a closed sender is never used again; the body handed
to a sender is the request's text (each kind encodes it for its remote, e.g. MLLP's ``encoding``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from medagent.channels.base import OutboundSender, outbound_sender

__all__ = ["OutboundSenders", "UnknownDestination"]

log = logging.getLogger("medagent.outbound")


class UnknownDestination(ValueError):
    """A push to a URL whose scheme has no outbound sender."""


class OutboundSenders:
    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self._settings: dict[str, Any] = dict(settings or {})
        self._senders: dict[str, OutboundSender] = {}
        self._hub: Any = None  # the runtime's HubClient, for senders that fetch from the hub (DICOM)

    def use_hub(self, hub: Any) -> None:
        """Senders built from now on may take ``hub`` (e.g. a DICOM push of the hub's WADO-RS URLs)."""
        self._hub = hub

    @property
    def settings(self) -> Mapping[str, Any]:
        return dict(self._settings)

    def for_remote(self, remote: str) -> OutboundSender:
        """The sender for ``remote``'s scheme (built on first use); UnknownDestination if none."""
        scheme = urlsplit(remote).scheme if "://" in remote else ""
        sender = self._senders.get(scheme)
        if sender is not None:
            return sender
        try:
            factory = outbound_sender(scheme)
        except (LookupError, ImportError):
            raise UnknownDestination(f"cannot send to {scheme or remote!r} destinations") from None
        offered = {**self._settings, "hub": self._hub} if self._hub is not None else self._settings
        sender = self._senders[scheme] = factory(**_accepted(factory, offered))
        return sender

    async def configure(self, settings: Mapping[str, Any]) -> None:
        """New Agent settings: close the senders built with the old ones (rebuilt on use)."""
        if dict(settings) == self._settings:
            return
        self._settings = dict(settings)
        old, self._senders = self._senders, {}
        for sender in old.values():
            await sender.close()
        log.info("outbound settings: %s", ", ".join(f"{k}={v}" for k, v in self._settings.items()) or "defaults")

    def collect_idle(self) -> None:
        """Housekeeping tick: senders that pool connections close idle ones."""
        for sender in self._senders.values():
            collect = getattr(sender, "collect_idle", None)
            if collect is not None:
                collect()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sender in self._senders.values():
            stats = getattr(sender, "stats", None)
            if stats is not None:
                out.update(stats())
        return out

    async def close(self) -> None:
        senders, self._senders = self._senders, {}
        for sender in senders.values():
            await sender.close()


def _accepted(factory: Callable[..., Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings ``factory`` can take as keyword arguments."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return dict(settings)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(settings)
    names = {p.name for p in parameters if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return {key: value for key, value in settings.items() if key in names}
