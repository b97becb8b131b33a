"""Small value types shared by rule matching, the map writer and the DNS stage."""

from __future__ import annotations

import dataclasses

PROTOCOLS = ("all", "tcp", "udp", "icmp")


@dataclasses.dataclass(frozen=True, slots=True)
class PortSpec:
    """One entry of a rule's port list; an empty list of them means every port."""

    port: int
    protocol: str = "all"  # all | tcp | udp | icmp


@dataclasses.dataclass(frozen=True, slots=True)
class HostnameVerdict:
    """What the hostname rules say about one name (reference §3.5).

    A side is present when its rule string is non-empty; empty ports = all ports. Both sides
    present is a mixed verdict (search-domain stripping can produce one).
    """

    allow_rule: str = ""
    allow_ports: tuple[PortSpec, ...] = ()
    deny_rule: str = ""
    deny_ports: tuple[PortSpec, ...] = ()

    @property
    def has_allow(self) -> bool:
        return bool(self.allow_rule)

    @property
    def has_deny(self) -> bool:
        return bool(self.deny_rule)

    @property
    def matched(self) -> bool:
        return self.has_allow or self.has_deny
