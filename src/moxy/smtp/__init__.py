"""Sans-I/O SMTP: bytes in, events out; replies in, bytes out. No sockets, no trio, no clock."""
