"""One policy rule, normalized: what the loader produces and every matcher consumes."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress

from .verdict import PortSpec

ACTIONS = ("allow", "deny")
RULE_TYPES = ("hostname", "cidr")


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    type: str                         # hostname | cidr
    value: str                        # lowercased name or glob; canonical CIDR text
    action: str                       # allow | deny
    ports: tuple[PortSpec, ...] = ()  # empty = every port on every protocol
    auto_added_type: str = ""

    @property
    def is_pattern(self) -> bool:
        return self.type == "hostname" and "*" in self.value

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return network_of(self.value)


@functools.lru_cache(maxsize=1 << 16)
def network_of(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    # Matchers, the map state and reloads all ask; parsing is the slow part of ipaddress.
    return ipaddress.ip_network(value)
