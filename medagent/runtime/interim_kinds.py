"""INTERIM: the ``mllp`` channel kind and outbound sender, until ``channels/hl7.py`` registers its own.

Why this exists: the runtime builds every channel through the registry in
:mod:`medagent.channels.base` and sends every hub push through ``outbound_sender(scheme)``. The
HL7 adapter (``channels/hl7.py``, ``channels/mllp_client.py``) is being moved onto that seam by
another change; until it registers the ``mllp`` kind and sender itself, :func:`ensure_registered`
registers these thin adapters around today's :class:`Hl7Channel` and :class:`MllpClientPool`.
It never replaces a registration that exists, so once the real one lands this module is inert
and is to be deleted (with its import in ``config.py`` and ``runtime/agent.py``).

The outbound adapter fixes defect 5 of issue 13 at the seam: the pool is called with the body
encoded in the remote's ``encoding`` (``mllp://h:p?encoding=windows-1252``) and the device's
reply is decoded with it, not with UTF-8.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from medagent.channels import base
from medagent.channels.endpoint import AckMode, Endpoint, MllpOptions, mllp_options
from medagent.records import HL7_V2_CONTENT_TYPE

__all__ = ["ensure_registered"]

_MLLP_SCHEMES = ("mllp",)


def _interim_create() -> Any:
    """The create function of the interim kind (imports today's Hl7Channel only when needed)."""
    from medagent.channels.hl7 import Hl7Channel, Hl7Connection

    class _InterimHl7Channel(Hl7Channel):
        """Today's Hl7Channel with the Channel protocol's missing members (kind, sockets, ...)."""

        @property
        def kind(self) -> str:
            return self.endpoint.scheme

        @property
        def wants_replies(self) -> bool:
            return self.options.ack_mode in (AckMode.ORIGINAL, AckMode.TWO_PHASE)

        @property
        def encoding(self) -> str:
            return self.options.encoding

        async def start(self, sock: socket.socket | None = None) -> None:
            if sock is None:
                await super().start()
                return
            # Listen on a handed-over socket (reload keeps the port without a gap).
            self._stopping = False
            self.reading_paused = False
            self._server = await asyncio.get_running_loop().create_server(
                lambda: Hl7Connection(self), sock=sock, backlog=512)

        def listening_sockets(self) -> list[socket.socket]:
            server = self._server
            return list(server.sockets) if server is not None else []  # type: ignore[arg-type]

    def create(name: str, endpoint: Endpoint, options: MllpOptions, context: base.ChannelContext) -> base.Channel:
        return _InterimHl7Channel(name, endpoint, options, context.sink, log_phi=context.log_phi)  # type: ignore[arg-type]

    return create


class _InterimMllpSender:
    """MllpClientPool behind the OutboundSender protocol, in the remote's encoding (defect 5)."""

    def __init__(self, **settings: Any) -> None:
        from medagent.channels.mllp_client import MllpClientPool

        self.pool = MllpClientPool(**settings)

    async def send(self, remote: str, body: str, content_type: str, *, return_ack: str | None = None,
                   timeout: float | None = None) -> base.OutboundReply:
        encoding = self.pool.target(remote).encoding
        try:
            payload = body.encode(encoding)
        except UnicodeEncodeError as exc:
            raise ValueError(f"the message cannot be encoded as {encoding} (character at {exc.start})") from None
        reply = await self.pool.send(remote, payload, return_ack)
        return base.OutboundReply(reply.decode(encoding, errors="replace"), HL7_V2_CONTENT_TYPE)

    def collect_idle(self) -> None:
        self.pool.collect_idle()

    def stats(self) -> dict[str, Any]:
        return self.pool.stats()

    async def close(self) -> None:
        await self.pool.close()


def ensure_registered() -> None:
    """Register the interim mllp kind and sender where nothing is registered for them yet."""
    for scheme in _MLLP_SCHEMES:
        try:
            base.channel_kind(scheme)
        except base.UnknownChannelKind:
            base.register_kind(base.ChannelKind(
                scheme=scheme, parameters=(), parse_options=mllp_options, create=_interim_create(),
                description="HL7 v2 over MLLP (interim adapter)"))
        try:
            base.outbound_sender(scheme)
        except base.UnknownChannelKind:
            base.register_outbound_sender(scheme, _InterimMllpSender)
