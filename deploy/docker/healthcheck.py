"""The container's HEALTHCHECK: one SMTP round trip (greeting, NOOP, QUIT) with Moxy.

Reads the address from the configuration's first [server] listen entry (a wildcard address is
asked on loopback), so it follows a mounted configuration. Standard library only. Exit 0 when
Moxy greets with 220 and answers NOOP with 250; otherwise one line on stderr and exit 1.

    python3 healthcheck.py [--config /etc/moxy/moxy.toml] [--timeout 5]
"""

from __future__ import annotations

import argparse
import smtplib
import sys
import tomllib

WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
DEFAULT_LISTEN = "127.0.0.1:2525"  # Moxy's default [server] listen


def address(config_path: str) -> tuple[str, int]:
    with open(config_path, "rb") as config:
        listen = tomllib.load(config).get("server", {}).get("listen", [DEFAULT_LISTEN])
    first = listen[0] if isinstance(listen, list) else listen
    host, _, port = str(first).rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    return WILDCARDS.get(host, host), int(port)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="/etc/moxy/moxy.toml")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    try:
        host, port = address(args.config)
        with smtplib.SMTP(host, port, timeout=args.timeout) as smtp:
            code, text = smtp.noop()
            if code != 250:
                raise smtplib.SMTPResponseException(code, text)
    except (OSError, ValueError, tomllib.TOMLDecodeError, smtplib.SMTPException) as exc:
        print(f"healthcheck: {args.config}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
