"""Moxy: a transparent SMTP routing proxy that answers as MX and proxies each transaction live."""

__version__ = "0.1.0"
