"""Connections open before sluice starts (reference §6.3): parsing /proc/net text and the
decision per remote address. The caller reads the files and performs the writes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence

from ..addresses import ipv6_text
from .autoallow import get_auto_allowed_type_for_hostname
from .model import Policy
from .verdict import PortSpec

# /proc/net state codes kept: TCP established, SYN-sent, SYN-received; UDP "connected".
LIVE_STATES = {"tcp": {"01", "02", "03"}, "udp": {"01"}}


def parse_proc_net(text: str, protocol: str) -> dict[str, set[tuple[int, str]]]:
    """Remote address -> {(port, protocol)} of one /proc/net/{tcp,tcp6,udp,udp6} text."""
    remotes: dict[str, set[tuple[int, str]]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[0].endswith(":") or fields[3] not in LIVE_STATES[protocol]:
            continue
        remote = _remote(fields[2])
        if remote is not None:
            remotes.setdefault(remote[0], set()).add((remote[1], protocol))
    return remotes


def _remote(column: str) -> tuple[str, int] | None:
    """Address text and port of a `HEX:PORT` column, or None for addresses never gated."""
    address_hex, _, port_hex = column.partition(":")
    raw = bytes.fromhex(address_hex)
    # The kernel prints each 32-bit word in host (little-endian) order.
    packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    addr = ipaddress.ip_address(packed)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified or addr.is_loopback or addr.is_link_local:
        return None
    text = ipv6_text(addr.packed) if addr.version == 6 else str(addr)
    return text, int(port_hex, 16)


def scan_connections(tcp: str = "", tcp6: str = "", udp: str = "",
                     udp6: str = "") -> dict[str, list[tuple[int, str]]]:
    """Remote address -> sorted distinct (port, tcp|udp) over the four /proc/net texts."""
    merged: dict[str, set[tuple[int, str]]] = {}
    for text, protocol in ((tcp, "tcp"), (tcp6, "tcp"), (udp, "udp"), (udp6, "udp")):
        for ip, ports in parse_proc_net(text, protocol).items():
            merged.setdefault(ip, set()).update(ports)
    return {ip: sorted(ports) for ip, ports in merged.items()}


@dataclasses.dataclass(frozen=True, slots=True)
class ExistingConnection:
    """The decision for one remote address, and the existing_connection record's fields."""

    dst_ip: str
    dst_hostname: str
    matched_rule: str          # the tracked name the hostname matched, "" if none
    auto_allowed_type: str
    allowed: bool
    writes: tuple[tuple[str, tuple[PortSpec, ...]], ...]  # add_ip (action, ports), in order


def gate_existing_connection(policy: Policy, ip: str, observed: Sequence[tuple[int, str]],
                             hostname: str = "") -> ExistingConnection:
    """Keep the connection open unless its hostname is explicitly denied (and only denied):
    write the deny side if any, then allow the rule's ports or else the observed ones.
    Log the record when allowed is False, or when the last write reports a change."""
    tracked = policy.find_tracked_hostname(hostname) if hostname else ""
    verdict = policy.match_hostname(hostname) if hostname else None
    auto_type = get_auto_allowed_type_for_hostname(policy, hostname) if hostname else ""
    if tracked and verdict is not None and verdict.has_deny and not verdict.has_allow:
        return ExistingConnection(ip, hostname, tracked, auto_type, False, ())
    writes = []
    if verdict is not None and verdict.has_deny:
        writes.append(("deny", verdict.deny_ports))
    if verdict is not None and verdict.has_allow:
        writes.append(("allow", verdict.allow_ports))
    else:
        writes.append(("allow", tuple(PortSpec(port, proto) for port, proto in observed)))
    return ExistingConnection(ip, hostname, tracked, auto_type, True, tuple(writes))
