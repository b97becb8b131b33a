"""The environment form's entry grammar (reference §3.3): `host[:p1;p2...]`.

A bare IP or CIDR is taken whole; bracketed IPv6 carries ports after `]:`; anything else is
split at its last colon. Ports apply to every protocol; an empty port list means all ports.
"""

from __future__ import annotations

import ipaddress


def split_list(text: str) -> list[str]:
    """Comma-separated items, trimmed, empty items dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def split_entry(entry: str) -> tuple[str, list[int]]:
    """(host, ports) of one entry; ValueError says what is wrong with it."""
    if _is_network(entry):
        return entry, []
    if entry.startswith("["):
        return _bracketed(entry)
    host, colon, ports = entry.rpartition(":")
    if not colon:
        return entry, []
    if ":" in host and not _is_network(host):
        raise ValueError("an IPv6 address with ports needs brackets, e.g. [2001:db8::1]:443")
    return host.strip(), parse_port_list(ports)


def _bracketed(entry: str) -> tuple[str, list[int]]:
    close = entry.find("]")
    if close == -1:
        raise ValueError('"[" without a closing "]"')
    host, rest = entry[1:close], entry[close + 1:]
    if not rest:
        return host, []
    if not rest.startswith(":"):
        raise ValueError(f'expected ":" and ports after "]", found "{rest}"')
    return host, parse_port_list(rest[1:])


def parse_port_list(text: str) -> list[int]:
    """`;`-separated ports, tokens trimmed, empty tokens skipped."""
    ports = []
    for token in (t.strip() for t in text.split(";")):
        if not token:
            continue
        if not (token.isascii() and token.isdigit()):
            raise ValueError(f'port "{token}" is not a number')
        if int(token) > 65535:
            raise ValueError(f"port {token} is outside 0-65535")
        ports.append(int(token))
    return ports


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True
