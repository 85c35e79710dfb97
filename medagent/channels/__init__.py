"""Channel adapters: asyncio skins that move bytes between sockets and the protocol cores.

* `medagent.channels.endpoint`: endpoint / remote URL parsing and typed channel options.
* `medagent.channels.ackpolicy`: which HL7 ACK to send when (pure decision rules).
* `medagent.channels.hl7`: the inbound MLLP listener (`Hl7Channel`, the `InboundSink` it feeds).
* `medagent.channels.mllp_client`: the outbound MLLP client pool (`MllpClientPool`).
"""

from medagent.channels.ackpolicy import AckCode, AckDecision
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
from medagent.channels.hl7 import Hl7Channel, InboundSink
from medagent.channels.mllp_client import MllpClientError, MllpClientPool

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
