"""The firewall maps as userspace sees them: one adapter interface, two implementations.

RuleMaps is what the policy stage writes through. KernelRuleMaps (pipeline/kernel/maps.py)
encodes into the pinned BPF maps; DictRuleMaps here keeps plain dicts and models the
classifier's lookup (bpf/sluice.c verdict_v4/verdict_v6) so pure tests can ask what the
kernel would decide.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

DENY = 0
ALLOW = 1

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")


class RuleMaps(Protocol):
    def set_config(self, default_action: int, audit_mode: bool, generation: int) -> None: ...
    def get_config(self) -> tuple[int, bool, int]: ...

    def put_cidr(self, network: Network, action: int, port_specific: bool) -> None: ...
    def get_cidr(self, network: Network) -> tuple[int, bool] | None: ...
    def delete_cidr(self, network: Network) -> None: ...
    def cidrs(self) -> Iterator[tuple[Network, int, bool]]: ...

    # Port rules: (network, port, L4 protocol number). A wildcard is network 0.0.0.0/0 or ::/0.
    def put_port(self, network: Network, port: int, proto: int, action: int) -> None: ...
    def delete_port(self, network: Network, port: int, proto: int) -> None: ...
    def ports(self) -> Iterator[tuple[Network, int, int, int]]: ...


class DictRuleMaps:
    """Dict-backed twin of the kernel maps, with the classifier's lookup as a model."""

    def __init__(self) -> None:
        self.config = (DENY, False, 0)
        self.cidr_entries: dict[Network, tuple[int, bool]] = {}
        self.port_entries: dict[tuple[Network, int, int], int] = {}

    def set_config(self, default_action: int, audit_mode: bool, generation: int) -> None:
        self.config = (default_action, bool(audit_mode), generation)

    def get_config(self) -> tuple[int, bool, int]:
        return self.config

    def put_cidr(self, network: Network, action: int, port_specific: bool) -> None:
        self.cidr_entries[network] = (action, bool(port_specific))

    def get_cidr(self, network: Network) -> tuple[int, bool] | None:
        return self.cidr_entries.get(network)

    def delete_cidr(self, network: Network) -> None:
        self.cidr_entries.pop(network, None)

    def cidrs(self) -> Iterator[tuple[Network, int, bool]]:
        for network, (action, port_specific) in list(self.cidr_entries.items()):
            yield network, action, port_specific

    def put_port(self, network: Network, port: int, proto: int, action: int) -> None:
        self.port_entries[(network, port, proto)] = action

    def delete_port(self, network: Network, port: int, proto: int) -> None:
        self.port_entries.pop((network, port, proto), None)

    def ports(self) -> Iterator[tuple[Network, int, int, int]]:
        for (network, port, proto), action in list(self.port_entries.items()):
            yield network, port, proto, action

    def verdict(self, ip: str, port: int, proto: int) -> int:
        """What the classifier decides for a packet to ip:port/proto (TCP/UDP/ICMP)."""
        addr = ipaddress.ip_address(ip)
        cidr = _longest(addr, ((n, v) for n, v in self.cidr_entries.items()))
        if cidr is not None and not cidr[1]:
            return cidr[0]
        rule = _longest(addr, ((n, a) for (n, p, pr), a in self.port_entries.items()
                               if p == port and pr == proto))
        if rule is not None:
            return rule
        return self.config[0]


def _longest(addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
             entries: Iterable[tuple[Network, T]]) -> T | None:
    best, best_len = None, -1
    for network, value in entries:
        if network.version == addr.version and addr in network and network.prefixlen > best_len:
            best, best_len = value, network.prefixlen
    return best
