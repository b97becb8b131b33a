"""Address text exactly as cargowall renders it (Go's net.IP.String), fast enough for the
ring-buffer drain. Every map keyed by an address string depends on this one rendering."""

from __future__ import annotations

import ipaddress
import socket
import struct

_V4 = struct.Struct("!I")
_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def ipv4_text(host_order: int) -> str:
    """An IPv4 address given as the kernel record's host-order integer."""
    return socket.inet_ntoa(_V4.pack(host_order))


def ipv6_text(packed: bytes) -> str:
    """RFC 5952 lowercase text; IPv4-mapped addresses print as a dotted quad, as Go does."""
    if packed[:12] == _MAPPED_PREFIX:
        return socket.inet_ntoa(packed[12:])
    if packed[:12] == bytes(12) and packed[12:14] != b"\x00\x00":
        # glibc prints IPv4-compatible addresses (::a.b.c.d); Go prints hex groups.
        return ipaddress.IPv6Address(packed).compressed
    return socket.inet_ntop(socket.AF_INET6, packed)


def canonical(text: str) -> str:
    """Canonical text for an address typed by a user or read from a file."""
    addr = ipaddress.ip_address(text.strip())
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return ipv6_text(addr.packed) if addr.version == 6 else str(addr)
