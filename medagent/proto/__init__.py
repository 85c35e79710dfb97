"""Sans-I/O protocol cores: bytes in, events and bytes out. No sockets, asyncio or sqlite here."""
