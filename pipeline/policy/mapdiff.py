"""The order of map operations that moves the firewall from one content to another.

The classifier reads the maps while they change, so every intermediate state matters. The
plan keeps each connection that is allowed before and after allowed at every step:

- writing an allow or deleting a deny never denies anything, so allows go in first;
- stale port denies that a later step could expose (they overlap a network turning port
  specific, a stale LPM entry, or a stale port allow) go early; the rest go last, so traffic
  both contents deny stays denied as long as possible;
- the default action and audit flag relax ("relax" step) before lookups can fall back to
  the default, and tighten after the last step (the caller's job);
- LPM entries are written longest first, so an all-ports deny lands after the longer
  entries that carve allows out of it;
- stale LPM entries go: all-ports denies that a fallback could land on, then port-specific
  ones (falling back from one to another does not change the port lookup), then all-ports
  allows longest first, so every lookup falls back to an entry already in its final state;
- port denies, and the removal of stale port allows (longest first), come once every LPM
  entry is final.

tests/unit/test_firewall.py checks the promise after every single operation of random reloads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from ..rulemaps import ALLOW, DENY, Network
from .mapstate import CidrValue, PortEntry

ALL_PORTS_ALLOW: CidrValue = (ALLOW, False)
ALL_PORTS_DENY: CidrValue = (DENY, False)

# ("put_cidr", network, value) | ("delete_cidr", network) | ("put_port", entry, action)
# | ("delete_port", entry) | ("relax",)
Operation = tuple[Any, ...]
# A network, or a port entry keyed by one.
Entry = TypeVar("Entry", bound=Network | PortEntry)


def plan_move(cidrs_now: Mapping[Network, CidrValue], ports_now: Mapping[PortEntry, int],
              cidrs: Mapping[Network, CidrValue], ports: Mapping[PortEntry, int],
              delete: bool = True) -> list[Operation]:
    """Operations taking the maps from (cidrs_now, ports_now) to (cidrs, ports); with
    delete False, entries that are not wanted stay (an add-only sync)."""
    put_ports = {e: a for e, a in ports.items() if ports_now.get(e) != a}
    put_cidrs = {n: v for n, v in cidrs.items() if cidrs_now.get(n) != v}
    stale_ports = longest_first(e for e in ports_now if delete and e not in ports)
    stale_cidrs = longest_first(n for n in cidrs_now if delete and n not in cidrs)
    stale_port_denies = [e for e in stale_ports if ports_now[e] == DENY]
    stale_port_allows = [e for e in stale_ports if ports_now[e] == ALLOW]
    stale_denies = [n for n in stale_cidrs if cidrs_now[n] == ALL_PORTS_DENY]
    early_port_denies = _overlapping(stale_port_denies, lambda: [
        *(n for n, v in put_cidrs.items() if v[1]), *stale_cidrs,
        *(e[0] for e in stale_port_allows)])
    early_denies = _overlapping(stale_denies, lambda: [
        n for n in stale_cidrs if cidrs_now[n] != ALL_PORTS_DENY])
    return [
        *(("put_port", e, ALLOW) for e, a in put_ports.items() if a == ALLOW),
        *(("delete_port", e) for e in early_port_denies),
        ("relax",),
        *(("put_cidr", n, put_cidrs[n]) for n in longest_first(put_cidrs)),
        *(("delete_cidr", n) for n in early_denies),
        *(("delete_cidr", n) for n in stale_cidrs if cidrs_now[n][1]),
        *(("delete_cidr", n) for n in stale_cidrs if cidrs_now[n] == ALL_PORTS_ALLOW),
        *(("put_port", e, DENY) for e, a in put_ports.items() if a == DENY),
        *(("delete_port", e) for e in stale_port_allows),
        *(("delete_cidr", n) for n in stale_denies if n not in early_denies),
        *(("delete_port", e) for e in stale_port_denies if e not in early_port_denies),
    ]


def _overlapping(entries: list[Entry],
                 networks: Callable[[], list[Network]]) -> dict[Entry, None]:
    """The entries (networks or port entries) overlapping any of networks(), in order;
    networks() is only asked for when there are entries to check."""
    if not entries:
        return {}
    index = NetworkIndex(networks())
    return {e: None for e in entries if index.overlaps(e[0] if isinstance(e, tuple) else e)}


def longest_first(entries: Iterable[Entry]) -> list[Entry]:
    """Networks, or port entries keyed by network, most specific first."""
    return sorted(entries, key=lambda e: -(e[0] if isinstance(e, tuple) else e).prefixlen)


class NetworkIndex:
    """Whether a network overlaps (contains or lies inside) any network of a set, in
    O(prefix length) set lookups."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks: set[tuple[int, int, int]] = set()
        self.prefixes: set[tuple[int, int, int]] = set()
        for network in networks:
            key = _key(network)
            self.networks.add(key)
            self.prefixes.update(_prefix(key, length) for length in range(key[2] + 1))

    def overlaps(self, network: Network) -> bool:
        key = _key(network)
        return key in self.prefixes or any(
            _prefix(key, length) in self.networks for length in range(key[2] + 1))


def _key(network: Network) -> tuple[int, int, int]:
    bits = int(network.network_address) >> (network.max_prefixlen - network.prefixlen)
    return network.version, bits, network.prefixlen


def _prefix(key: tuple[int, int, int], length: int) -> tuple[int, int, int]:
    version, bits, prefixlen = key
    return version, bits >> (prefixlen - length), length
