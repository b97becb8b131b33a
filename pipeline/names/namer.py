"""What enrich knows of a destination's name: pure logic, time passed in.

Resolution of one address (reference §2.2), stopping at the first hit:

1. the DNS-derived cache (pipeline.policy.namecache.HostnameCache, fed by the dns stage's
   mappings): the exact address, else the forward match over the current policy's tracked
   hostnames (a tracked name whose answers included the address);
2. a reverse (PTR) lookup, once per address: the lookup runs elsewhere
   (pipeline/names/reverse.py); this module decides when one is due and what its answer means;
3. the CNAME origin override: a chain recorded for the address replaces what 1-2 found.

The reference asks the forward match again after an empty PTR answer. Here it is part of
step 1 and not repeated: a tracked name's answer list only grows through a mapping, which
also names the address exactly, so a second look could not find more.

Times are seconds taken from the records themselves (the mapping's or the event's own
timestamp), so a replayed recording ages and expires names as the live run did.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from ..events import DnsMapping
from ..policy.model import Policy
from ..policy.namecache import HostnameCache

ATTEMPTED_CAPACITY = 10_000  # addresses remembered as looked up (reference §2.2)
# Reverse lookups begun: LOOKUP_RATE a second over time, LOOKUP_BURST at once.
LOOKUP_RATE = 100.0
LOOKUP_BURST = 256
NS_PER_S = 1e9

Held = TypeVar("Held")


def ptr_hostname(answer: str, policy: Policy) -> str:
    """A PTR answer as a destination name (reference §2.2): one trailing dot stripped,
    lowercased, then the name a rule tracks it by (a host under a parent rule is reported
    as the parent; exact and pattern matches keep the full name)."""
    name = (answer[:-1] if answer.endswith(".") else answer).lower()
    if not name:
        return ""
    return policy.find_tracked_hostname(name) or name


class LookupBudget:
    """How many reverse lookups may begin: a token bucket on the events' own clock.

    A scan sends packets to thousands of addresses nothing named; one PTR question each
    would turn it into as many questions at the resolver that also answers the DNS proxy
    (and, measured in a flood, make enrich the busiest stage after persist). Beyond the
    budget an address goes on unnamed and is not marked attempted: a later event may look
    it up.
    """

    def __init__(self, rate: float = LOOKUP_RATE, burst: int = LOOKUP_BURST) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.at: float | None = None  # the latest time seen; events may arrive out of order

    def take(self, now_s: float) -> bool:
        """Whether a lookup may begin at now_s (one token is used if so)."""
        if self.at is None or now_s > self.at:
            if self.at is not None:
                self.tokens = min(self.burst, self.tokens + (now_s - self.at) * self.rate)
            self.at = now_s
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class AttemptedSet:
    """Addresses a reverse lookup was made for; beyond capacity the oldest is forgotten."""

    def __init__(self, capacity: int = ATTEMPTED_CAPACITY) -> None:
        self.capacity = capacity
        self._ips: dict[str, None] = {}  # insertion order = order of attempt

    def __contains__(self, ip: str) -> bool:
        return ip in self._ips

    def __len__(self) -> int:
        return len(self._ips)

    def add(self, ip: str) -> None:
        if ip in self._ips:
            return
        self._ips[ip] = None
        if len(self._ips) > self.capacity:
            del self._ips[next(iter(self._ips))]

    def discard(self, ip: str) -> None:
        """A lookup that never reached the resolver does not count as an attempt."""
        self._ips.pop(ip, None)


class Namer:
    """The IP -> name knowledge of enrich: the cache, the policy's tracked hostnames and the
    set of addresses already looked up."""

    def __init__(self, policy: Policy, cache: HostnameCache | None = None,
                 attempted: AttemptedSet | None = None) -> None:
        # Both have a length, so an empty one is falsy: compare with None.
        self.cache = HostnameCache() if cache is None else cache
        self.attempted = AttemptedSet() if attempted is None else attempted
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.cache.set_tracked(policy.tracked_hostnames)

    def learn(self, mapping: DnsMapping) -> None:
        """A name the dns stage resolved: its addresses and, if any, its CNAME chain."""
        now = mapping.timestamp_ns / NS_PER_S
        for ip in mapping.ips:
            self.cache.update_dns_mapping(mapping.name, ip, now)
            self.cache.record_cname_chain(ip, mapping.cname_chain, mapping.ttl, now)

    def wants_lookup(self, ip: str) -> bool:
        """Step 2's condition: nothing cached and never attempted."""
        return ip not in self.attempted and not self.cache.lookup_hostname_by_ip(ip)

    def name_of(self, ip: str, timestamp_ns: int) -> tuple[str, list[str]]:
        """(hostname, cname_chain) as known now; ("", []) when nothing is."""
        chain = self.cache.cname_chain(ip, timestamp_ns / NS_PER_S)
        if chain:
            return chain[0], list(chain)
        return self.cache.lookup_hostname_by_ip(ip), []

    def lookup_ended(self, ip: str, answer: str, timestamp_ns: int) -> str:
        """Step 2 once the reverse lookup for ip ended (answer "" when it gave no name): the
        name is stored as a mapping, unless one arrived meanwhile (step 1 comes first).
        Returns the name stored for ip, or ""."""
        if ip in self.cache.names:
            return ""
        name = ptr_hostname(answer, self.policy)
        if name:
            self.cache.update_dns_mapping(name, ip, timestamp_ns / NS_PER_S)
        return name


class HeldEvents(Generic[Held]):
    """Events waiting for their address's reverse lookup, in arrival order per address.

    At most `limit` events are held in all: to make room, the address that has waited
    longest is let go (its events are returned, in order, to be sent on unnamed), so a
    flood of new addresses costs names, never events.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._by_ip: dict[str, list[Held]] = {}  # insertion order = order the wait began
        self.count = 0

    def __contains__(self, ip: str) -> bool:
        return ip in self._by_ip

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._by_ip))

    def hold(self, ip: str, event: Held, *, begin: bool = False) -> list[Held]:
        """Hold event behind its address (begin=True starts a wait for a new address).
        Returns the events let go to stay within the limit; when that includes the
        address's own earlier events, event itself is not held but returned last."""
        overflow: list[Held] = []
        while self.count >= self.limit:
            overflow += self.release(next(iter(self._by_ip)))
        if ip in self._by_ip or begin:
            self._by_ip.setdefault(ip, []).append(event)
            self.count += 1
        else:
            overflow.append(event)
        return overflow

    def release(self, ip: str) -> list[Held]:
        """Every event held for ip, in arrival order (none when ip is not held)."""
        events = self._by_ip.pop(ip, [])
        self.count -= len(events)
        return events
