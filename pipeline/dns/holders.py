"""Who holds an address the proxy could not bind: sockets read from /proc/net text.

The stage reads /proc/net/{udp,tcp}[6] and maps socket inodes to processes through
/proc/<pid>/fd; the parsing lives here so it is tested on captured text.
"""

from __future__ import annotations

import ipaddress
import sys

TCP_LISTEN = "0A"


def _address(hex_text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The kernel prints each 32-bit word of the address in host byte order."""
    words = [int(hex_text[i:i + 8], 16).to_bytes(4, sys.byteorder)
             for i in range(0, len(hex_text), 8)]
    return ipaddress.ip_address(b"".join(words))


def holder_inodes(table: str, host: str, port: int, tcp: bool) -> list[int]:
    """Inodes of sockets in a /proc/net table bound to port on host or on a wildcard (a
    wildcard bind takes the port on every address); for TCP only listening ones."""
    wanted = ipaddress.ip_address(host)
    inodes = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or (tcp and fields[3] != TCP_LISTEN):
            continue
        hex_host, _, hex_port = fields[1].partition(":")
        if int(hex_port, 16) != port:
            continue
        address = _address(hex_host)
        if address == wanted or address.is_unspecified:
            inodes.append(int(fields[9]))
    return inodes
