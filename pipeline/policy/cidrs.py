"""CIDR rules: most specific match and the hostname/CIDR conflict check (reference §3.7)."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Sequence

from .ports import protocols_overlap
from .rules import Rule, network_of
from .verdict import PortSpec

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(text: str) -> Address:
    """An address as the maps key it: IPv4-mapped IPv6 is the IPv4 address."""
    addr = ipaddress.ip_address(text.strip())
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def canonical_cidr(text: str) -> str | None:
    """CIDR text with host bits masked and IPv6 compressed; a bare IP becomes /32 or /128."""
    text = text.strip()
    try:
        # Through the rules' parse cache: most values are canonical already.
        return str(network_of(text))
    except ValueError:
        pass
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return None


def host_network(addr: Address) -> Network:
    return ipaddress.ip_network(addr)


@dataclasses.dataclass(frozen=True, slots=True)
class Conflict:
    """CheckIPRuleConflict's answer: the action to write and the CIDR rule that forced it."""

    action: str
    conflict: bool = False
    rule: str = ""


class CidrMatcher:
    """CIDR rules indexed by family and prefix length for longest-prefix lookups."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = [r for r in rules if r.type == "cidr"]
        # family -> prefix lengths, longest first, each -> network -> rules in policy order
        self.by_prefix: dict[int, dict[int, dict[Network, list[Rule]]]] = {4: {}, 6: {}}
        for rule in self.rules:
            network = rule.network
            by_len = self.by_prefix[network.version].setdefault(network.prefixlen, {})
            by_len.setdefault(network, []).append(rule)
        self.lengths = {family: sorted(by_len, reverse=True)
                        for family, by_len in self.by_prefix.items()}

    def containing(self, addr: Address) -> Iterable[Rule]:
        """Rules whose network contains addr, most specific first, policy order on ties."""
        for length in self.lengths[addr.version]:
            network = ipaddress.ip_network((addr, length), strict=False)
            yield from self.by_prefix[addr.version][length].get(network, ())

    def most_specific(self, addr: Address) -> Rule | None:
        return next(iter(self.containing(addr)), None)

    def check_conflict(self, addr: Address, action: str, ports: Sequence[PortSpec]) -> Conflict:
        """What a hostname side may write for addr given the most specific CIDR rule."""
        rule = self.most_specific(addr)
        if rule is None or rule.action == action:
            return Conflict(action)
        if rule.ports and ports and not _share_a_port(rule.ports, ports):
            return Conflict(action)
        return Conflict("deny", True, rule.value)


def _share_a_port(a: Sequence[PortSpec], b: Sequence[PortSpec]) -> bool:
    return any(x.port == y.port and protocols_overlap(x.protocol, y.protocol)
               for x in a for y in b)
