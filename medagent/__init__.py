"""medagent: an on-premise healthcare integration gateway.

Accepts HL7 v2 over MLLP (and later DICOM, ASTM, byte streams) inside a hospital network, keeps
every accepted message in a durable local queue, and carries it over one outbound websocket to a
hub (a Medplum server or medagent's own) where bots process it.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
