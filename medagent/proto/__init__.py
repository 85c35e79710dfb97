"""Sans-I/O protocol cores: bytes in, events and bytes out. No sockets, asyncio or sqlite here.

HL7 v2: ``mllp`` (framing), ``hl7`` (header scan, ACK building, ``parse_ack``), ``ackpolicy``
(which ACK: mode x MSH-15/16 x outcome) and ``hl7_session`` (the per-connection ACK
sequencer: which ACK when, in arrival order). Each ``_fast`` kernel has its pure twin here.
"""
