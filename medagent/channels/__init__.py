"""Channel adapters: asyncio skins that move bytes between sockets and the protocol cores.

* `medagent.channels.base`: the Channel protocol and the kind registry by URL scheme.
* `medagent.channels.endpoint`: endpoint / remote URL parsing and typed channel options.
* `medagent.channels.hl7`: the ``mllp`` kind, the inbound MLLP listener (`Hl7Channel`) over
  the pure session core `medagent.proto.hl7_session` (ACK rules: `medagent.proto.ackpolicy`).
* `medagent.channels.mllp_client`: the outbound MLLP client pool (`MllpClientPool`), the
  ``mllp`` OutboundSender.
"""

from medagent.channels.base import InboundSink
from medagent.channels.endpoint import (
    AckMode,
    AppLevelAck,
    DuplicateBehavior,
    Endpoint,
    EndpointError,
    MllpOptions,
    RemoteTarget,
    ReturnAck,
    mllp_options,
    parse_endpoint,
    parse_remote,
)
from medagent.channels.hl7 import Hl7Channel
from medagent.channels.mllp_client import MllpClientError, MllpClientPool
from medagent.proto.ackpolicy import AckCode, AckDecision

__all__ = [
    "AckCode",
    "AckDecision",
    "AckMode",
    "AppLevelAck",
    "DuplicateBehavior",
    "Endpoint",
    "EndpointError",
    "Hl7Channel",
    "InboundSink",
    "MllpClientError",
    "MllpClientPool",
    "MllpOptions",
    "RemoteTarget",
    "ReturnAck",
    "mllp_options",
    "parse_endpoint",
    "parse_remote",
]
