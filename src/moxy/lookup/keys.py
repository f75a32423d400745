"""The order in which a recipient's lookup keys are tried: on every RCPT, so compiled in the
native build (moxy.native), which `base.py` with its attrs validators cannot be."""

from __future__ import annotations

from moxy.lookup.idn import ascii_domain

# Keys already made, by recipient as written: an MX hears the same recipients again and again,
# and making them is about 2,800 instructions (lower, partition, the parents). Bounded: emptied
# when full, recipients up to _KNOWN_LENGTH characters (as commands._SEEN_RCPT).
_KNOWN: dict[str, tuple[str, ...]] = {}
_KNOWN_MAX = 4096
_KNOWN_LENGTH = 300


def lookup_keys(recipient: str) -> tuple[str, ...]:
    """`keys_of(recipient)`, from memory when this recipient was seen before."""
    keys = _KNOWN.get(recipient)
    if keys is None:
        keys = keys_of(recipient)
        if len(recipient) <= _KNOWN_LENGTH:
            if len(_KNOWN) >= _KNOWN_MAX:
                _KNOWN.clear()
            _KNOWN[recipient] = keys
    return keys


def keys_of(recipient: str) -> tuple[str, ...]:
    """The keys tried for a recipient, most specific first.

    `User@Sub.Example.ORG.` → `user@sub.example.org`, `sub.example.org`, `.example.org`, `.org`,
    `*`. A bare local part (e.g. `postmaster`) tries itself, then `*`. Address literals
    (`[192.0.2.1]`) have no parents. A domain in UTF-8 is tried in its A-label form (idn.py):
    `user@bücher.example` → `user@xn--bcher-kva.example`, `xn--bcher-kva.example`, ...
    """
    address = recipient.lower()
    local, at, domain = address.rpartition("@")
    if not at:
        return (address, "*") if address else ("*",)
    domain = domain.rstrip(".")
    if not domain.isascii():
        domain = ascii_domain(domain) or domain  # not a valid IDN: as written (no file has it)
    keys = [f"{local}@{domain}", domain]
    if not domain.startswith("["):
        rest = domain
        while (dot := rest.find(".")) >= 0:  # each parent: what follows a dot, with the dot
            rest = rest[dot + 1 :]
            keys.append("." + rest)
    keys.append("*")
    return tuple(keys)
